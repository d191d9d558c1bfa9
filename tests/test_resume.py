"""Runs that survive: real `dynammo run` subprocesses killed (SIGKILL) or interrupted (SIGINT) in
the middle of a task and resumed end where an uninterrupted run ends, bit for bit (every method
resumes exactly: tests/test_method_contract.py); eval recomputes the recorded metrics; unsafe or
foreign checkpoints are refused."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
import yaml

from dynammo.configure import load_config
from dynammo.console import Console
from dynammo.errors import UserError
from dynammo.run.single import run_single
from dynammo.sealing import DIGEST_KEY, sealed
from method_helpers import DIGITS_8PX, QUIET, cli_args
from test_cli_e2e import ROOT, assert_user_error, wait_for

# DynaMMo: several stages per task (backbone, adapters, heads), so a kill lands inside a multi-stage task
DYN = cli_args({"method": "dynammo"}, DIGITS_8PX, max_train_per_class=30, memory_size=20, epochs=2, epochs_finetune=3,
               backbone_epochs=1, init_cls=4, increment=3, batch_size=8, **QUIET)


def start(cli, out, *extra):
    return cli.popen("-m", "dynammo", "run", "--out", out, *DYN, *extra)


def wait_for_log(out, needle, proc, timeout=300):
    wait_for(out / "log.txt", needle, proc, timeout)


def accuracies(out):
    r = json.loads((out / "results.json").read_text())
    return r["status"], r["acc_matrix"], r["acc"], r.get("task_id_acc")


@pytest.fixture(scope="module")
def uninterrupted(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "reference"
    proc = start(cli, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return accuracies(out)


def test_sigkill_mid_task_with_epoch_checkpoints_resumes_bit_for_bit(cli, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start(cli, out, "checkpoint_every=1")
    wait_for_log(out, "task 3/3 adapters epoch 1/2", proc)
    t0 = time.time()
    while not (out / "checkpoints" / "partial.pt").is_file():  # epoch 1's checkpoint, written after its log line
        assert time.time() - t0 < 120 and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "partial.pt").is_file() and (out / "checkpoints" / "task_1.pt").is_file()
    before = json.loads((out / "results.json").read_text())
    assert before["status"] == "running" and len(before["acc"]) == 2  # earlier results intact
    proc = cli("resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert accuracies(out) == uninterrupted
    assert not (out / "checkpoints" / "partial.pt").exists()
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert "resuming" in (out / "log.txt").read_text()


def test_sigkill_without_partial_checkpoint_restarts_the_task(cli, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start(cli, out)
    wait_for_log(out, "task 2/3 adapters epoch 1/2", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "partial.pt").exists()
    proc = cli("resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert accuracies(out) == uninterrupted


def test_sigint_saves_mid_epoch_and_exits_cleanly(cli, uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    proc = start(cli, out)
    wait_for_log(out, "task 2/3 heads epoch 1/3", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("stopped: SIGINT in task 2/3") and f"dynammo resume {out}" in lines[-1]
    assert "Traceback" not in err
    state = torch.load(out / "checkpoints" / "partial.pt", weights_only=True)
    assert state["task"] == 1 and state["journal"]["current"] is not None
    assert len(state["journal"]["finished"]) == 1  # the adapters stage finished, the heads stage was cut
    proc = cli("resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert accuracies(out) == uninterrupted
    assert_user_error(cli("resume", str(out)), "is complete; nothing to resume")


def test_sigterm_between_tasks_keeps_the_task_checkpoint(cli, uninterrupted, tmp_path):
    out = tmp_path / "terminated"
    proc = start(cli, out)
    wait_for_log(out, "task 1/3 done", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "stopped: SIGTERM" in err
    proc = cli("resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert accuracies(out) == uninterrupted


# ---------------- eval, main.py --checkpoint_dir, foreign and unsafe checkpoints ----------------


@pytest.fixture(scope="module")
def finished_run(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    proc = cli("run", "--out", str(out), "method=replay", "dataset=digits", "backbone=resnet20", "img_size=8",
               "max_train_per_class=20", "memory_size=20", "epochs=1", "init_cls=4", "increment=3",
               "progress=false", "plots=false", "tensorboard=false")
    assert proc.returncode == 0, proc.stderr
    return out


def test_eval_recomputes_the_recorded_metrics(cli, finished_run):
    r = json.loads((finished_run / "results.json").read_text())
    for task in (1, 2, 3):
        proc = cli("eval", str(finished_run), "--task", str(task), "--json")
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        assert res["acc"] == r["acc"][task - 1] and res["mcr"] == r["mcr"][task - 1]
        assert res["acc_per_task"] == r["acc_matrix"][task - 1][:task]
        assert res["task_il_acc"] == r["task_il_acc"][task - 1]
    proc = cli("eval", str(finished_run))
    assert proc.returncode == 0 and "identical" in proc.stdout and "after task 3" in proc.stdout


def test_main_py_checkpoint_dir_evaluates(cli, finished_run):
    r = json.loads((finished_run / "results.json").read_text())
    for target in (finished_run, finished_run / "checkpoints"):
        proc = cli.python(ROOT / "main.py", "--checkpoint_dir", target, "--device", "-1", timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"accuracy {r['acc'][-1]:.2f}" in proc.stdout and "identical" in proc.stdout


def copy_run(src, dst):
    shutil.copytree(src, dst)
    (dst / "results.json").write_text(json.dumps({**json.loads((dst / "results.json").read_text()),
                                                  "status": "running"}))
    return dst


@pytest.mark.parametrize("change,needle", [
    ({"seed": 5}, "class order"),  # another seed shuffles the classes differently
    ({"method": "finetune"}, "method"),
    ({"dataset": "digits-from-elsewhere"}, "dataset"),  # written into the checkpoints instead
])
def test_checkpoint_of_another_run_is_refused(cli, finished_run, tmp_path, change, needle):
    run = copy_run(finished_run, tmp_path / "run")
    if "dataset" in change:
        for path in (run / "checkpoints").glob("task_*.pt"):
            state = torch.load(path, weights_only=True)
            state["dataset"] = change["dataset"]
            state.pop(DIGEST_KEY, None)
            torch.save(sealed(state), path)  # a genuine checkpoint of another run: its own digest matches
    else:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg.update(change)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = (run / "checkpoints" / "task_2.pt").read_bytes()
    for cmd in ("resume", "eval"):
        assert_user_error(cli(cmd, str(run)), "belongs to another run", needle)
    assert (run / "checkpoints" / "task_2.pt").read_bytes() == before  # nothing touched


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_pickled_code_is_refused(cli, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    state = torch.load(run / "checkpoints" / "task_2.pt", weights_only=True)
    state["payload"] = _Exploit()
    torch.save(state, run / "checkpoints" / "task_2.pt")
    assert_user_error(cli("eval", str(run)), "task_2.pt", "damaged or not a dynammo checkpoint")
    assert_user_error(cli("resume", str(run)), "task_2.pt", "damaged or not a dynammo checkpoint")


def test_truncated_checkpoint_is_refused_by_resume_and_eval(cli, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    path = run / "checkpoints" / "task_2.pt"
    path.write_bytes(path.read_bytes()[:1000])
    assert_user_error(cli("resume", str(run)), "task_2.pt", "damaged")
    assert_user_error(cli("eval", str(run), "--task", "3"), "task_2.pt", "damaged")
    proc = cli("eval", str(run), "--task", "2")  # the earlier checkpoints still work
    assert proc.returncode == 0, proc.stderr


def test_resume_of_something_that_is_not_a_run(cli, tmp_path):
    assert_user_error(cli("resume", str(tmp_path)), "not a run directory")
    assert_user_error(cli("eval", str(tmp_path)), "not a run directory")


# ---------------- failures keep what was finished ----------------

SMALL_REPLAY = ["method=replay", "dataset=digits", "backbone=resnet20", "img_size=8", "max_train_per_class=20",
                "memory_size=20", "epochs=2", "init_cls=4", "increment=3", "progress=false", "plots=false",
                "tensorboard=false"]


def test_nan_loss_names_task_and_epoch_and_keeps_the_last_checkpoint(cli, tmp_path):
    out = tmp_path / "nan"
    proc = cli("run", "--out", str(out), *SMALL_REPLAY, "init_lrate=0.05", "lrate=1e30")  # task 2 diverges
    assert_user_error(proc, "training diverged", "task 2/3", "epoch 1", "lower lrate")
    state = torch.load(out / "checkpoints" / "task_0.pt", weights_only=True)
    assert state["task"] == 0
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "failed" and "diverged" in r["stopped_because"] and len(r["acc"]) == 1
    assert not (out / "checkpoints" / "task_1.pt").exists()
    proc = cli("eval", str(out))  # the last good model is still usable
    assert proc.returncode == 0 and "after task 1" in proc.stdout


def test_disk_full_while_writing_a_checkpoint(cli, tmp_path, monkeypatch, single_thread):
    """ENOSPC on the second checkpoint: one clear error, the first checkpoint and results intact,
    no half-written file left behind."""
    import errno

    import dynammo.io

    real_save, calls = torch.save, []

    def save_until_disk_is_full(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(dynammo.io.torch, "save", save_until_disk_is_full)
    cfg = load_config(None, SMALL_REPLAY)
    out = tmp_path / "full"
    with pytest.raises(UserError, match="could not write .*task_1.pt: No space left on device; free disk space"):
        run_single(cfg, out, Console(progress="false", quiet=True))
    monkeypatch.undo()
    assert torch.load(out / "checkpoints" / "task_0.pt", weights_only=True)["task"] == 0
    assert not (out / "checkpoints" / "task_1.pt").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    r = json.loads((out / "results.json").read_text())
    assert len(r["acc"]) == 1 and r["status"] == "failed"
    proc = cli("resume", str(out))  # space is back: the run continues from task 1's checkpoint
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "results.json").read_text())["status"] == "complete"


def test_file_backed_memory_is_saved_and_loaded_safely(cli, tmp_path):
    """Exemplars of a dataset read lazily from files are checkpointed as their sources (paths) and
    load with weights_only=True."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / c / f"{i}.png")
    out = tmp_path / "run"
    proc = cli("run", "--out", str(out), "method=replay", "dataset=folder", f"data_root={root}", "in_memory=false",
               "img_size=8", "backbone=resnet20", "init_cls=1", "increment=1", "memory_size=6", "epochs=1",
               "progress=false", "plots=false", "tensorboard=false")
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out / "checkpoints" / "task_1.pt", weights_only=True)
    sources = [s for v in state["state"]["memory"].values() for s in (v["sources"] or [])]
    assert sources and all(str(root) in str(s) for s in sources)
    proc = cli("eval", str(out), "--task", "2")
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stderr
