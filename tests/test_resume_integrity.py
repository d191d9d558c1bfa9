"""A resume continues the experiment its checkpoint was trained in (a config.yaml edited in a key
that changes results is refused; result-neutral keys may change and are recorded); a checkpoint whose
bytes were altered is refused by every loader (digest), while checkpoints from before digests still
load; config notes are printed only once a run can start."""
from __future__ import annotations

import json
import shutil
import struct
import zipfile

import pytest
import torch
import yaml

from test_cli_e2e import assert_user_error

SMALL = ["img_size=8", "max_train_per_class=20", "memory_size=20", "epochs=1", "init_cls=4", "increment=3",
         "backbone=resnet20", "progress=false", "plots=false", "tensorboard=false"]


@pytest.fixture(scope="module")
def finished(cli, tmp_path_factory):
    """A real tiny Replay run under the digits protocol (the overrides depart from it: notes)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    proc = cli("run", "-c", "digits", "-c", "replay", "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def interrupted_copy(src, dst):
    """The run as if stopped after task 2: its last checkpoint gone, results.json still running."""
    shutil.copytree(src, dst)
    (dst / "checkpoints" / "task_2.pt").unlink()
    results = json.loads((dst / "results.json").read_text())
    (dst / "results.json").write_text(json.dumps({**results, "status": "running"}))
    return dst


def edit_config(run, **changes):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(changes)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_notes_are_printed_once_the_run_starts(cli, finished, tmp_path):
    out, proc = finished
    notes = [l for l in proc.stdout.splitlines() if l.startswith("note: ")]
    assert any("protocol key img_size=8" in n for n in notes), proc.stdout
    log = (out / "log.txt").read_text()
    assert all(n in log for n in notes)  # the run directory's log keeps them too
    # a run refused for bad input (an impossible split, found when the data is built) prints its error only
    bad = cli("run", "-c", "digits", "-c", "replay", "--out", str(tmp_path / "bad"), *SMALL, "init_cls=20")
    assert_user_error(bad, "init_cls")
    assert "note:" not in bad.stdout + bad.stderr
    assert not (tmp_path / "bad").exists()


def test_resume_with_a_config_that_changes_results_is_refused(cli, finished, tmp_path):
    out, _ = finished
    run = interrupted_copy(out, tmp_path / "run")
    edit_config(run, lrate=7.5, batch_size=16)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_user_error(cli("resume", str(run)), "config.yaml", "lrate (0.05 -> 7.5)", "batch_size (64 -> 16)",
                      "task_1.pt")
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written


def test_resume_with_result_neutral_changes_continues_and_records_them(cli, finished, tmp_path):
    out, _ = finished
    run = interrupted_copy(out, tmp_path / "run")
    edit_config(run, num_workers=1, eval_batch_size=17)
    proc = cli("resume", str(run))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["resumed_with"] == [{"task": 3, "changed": {"eval_batch_size": {"checkpoint": 256, "now": 17},
                                                               "num_workers": {"checkpoint": 0, "now": 1}}}]
    original = json.loads((out / "results.json").read_text())
    assert results["acc_matrix"] == original["acc_matrix"]  # the same experiment, the same numbers


def alter_tensor_bytes(path):
    """Flip one byte inside the largest tensor of a checkpoint, leaving the zip structure intact."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 7] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_altered_checkpoint_is_refused_by_every_loader(cli, finished, tmp_path):
    out, _ = finished
    run = interrupted_copy(out, tmp_path / "run")
    path = run / "checkpoints" / "task_1.pt"
    assert "digest" in torch.load(path, weights_only=True)
    alter_tensor_bytes(path)
    torch.load(path, weights_only=True)  # torch itself notices nothing
    for args in (("resume", str(run)), ("export", str(run), "--out", str(tmp_path / "m.pt")),
                 ("eval", str(run), "--task", "2")):
        assert_user_error(cli(*args), "task_1.pt", "altered")
    assert not (tmp_path / "m.pt").exists()
    proc = cli("eval", str(run), "--task", "1")  # the untouched checkpoint still loads
    assert proc.returncode == 0, proc.stderr


def test_checkpoints_without_a_digest_still_load(cli, finished, tmp_path):
    out, _ = finished
    run = interrupted_copy(out, tmp_path / "run")
    for path in (run / "checkpoints").glob("task_*.pt"):
        state = torch.load(path, weights_only=True)
        del state["digest"]  # as written before digests existed
        torch.save(state, path)
    for args in (("eval", str(run), "--task", "2"), ("export", str(run), "--out", str(tmp_path / "m.pt")),
                 ("resume", str(run))):
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "results.json").read_text())["status"] == "complete"
