"""One rule for "complete": `dynammo run` (refuses any run directory), `dynammo resume` (refuses a
complete one), a sweep's state (skips a complete one) and `dynammo report` (averages only complete
ones) agree on run directories of every status, old (results.json without `status`) and new."""
from __future__ import annotations

import json
import shutil

import pytest

from dynammo.cli import main
from dynammo.configure import load_config
from dynammo.console import Console
from dynammo.errors import UserError
from dynammo.reporting.discover import discover
from dynammo.rundir import check_run_dir, run_status
from dynammo.run.single import resume_run, run_single
from method_helpers import DIGITS_8PX, QUIET, cli_args

SMALL = cli_args(DIGITS_8PX, QUIET, method="replay", max_train_per_class=12, max_test_per_class=5, memory_size=20,
                 epochs=1, init_cls=4, increment=3, batch_size=16)

# results.json edits -> is the run complete?
VARIANTS = {
    "as written": ({}, True),
    "no status (before it existed)": ({"status": None}, True),
    "no status, no acc_matrix": ({"status": None, "acc_matrix": None}, False),
    "running": ({"status": "running"}, False),
    "interrupted": ({"status": "interrupted"}, False),
    "failed": ({"status": "failed"}, False),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("status") / "run"
    run_single(load_config(None, SMALL), out, Console(progress="false", quiet=True))
    return out


def sweep_state(run_dir, capsys) -> str:
    """What `dynammo sweep --state RUN_DIR` prints (the SLURM script asks it)."""
    capsys.readouterr()
    assert main(["sweep", "--state", str(run_dir)]) == 0
    return capsys.readouterr().out.strip()


def variant(finished, dst, edits: dict):
    shutil.copytree(finished, dst)
    results = json.loads((dst / "results.json").read_text())
    for key, value in edits.items():
        if value is None:
            results.pop(key)
        else:
            results[key] = value
    (dst / "results.json").write_text(json.dumps(results))
    return dst


@pytest.mark.parametrize("name", list(VARIANTS))
def test_run_resume_sweep_and_report_agree(finished, tmp_path, name, capsys):
    edits, complete = VARIANTS[name]
    run_dir = variant(finished, tmp_path / "run", edits)
    assert run_status(run_dir) == sweep_state(run_dir, capsys) == ("complete" if complete else "resume")  # the sweep's state
    found = discover([run_dir])
    if "acc_matrix" in edits:  # not a results.json the report can read at all
        assert not found.runs and not found.unfinished and found.skipped
    else:
        assert bool(found.runs) == complete and bool(found.unfinished) == (not complete)
    with pytest.raises(UserError, match="already holds a run"):
        check_run_dir(run_dir)
    # every task has its checkpoint: an unfinished run can only miss its final write
    needle = "is complete; nothing to resume" if complete else "only missed its final write"
    with pytest.raises(UserError, match=needle):
        resume_run(run_dir, Console(progress="false", quiet=True))


def test_an_empty_folder_is_fresh_and_one_with_checkpoints_only_resumes(tmp_path, capsys):
    (tmp_path / "started" / "checkpoints").mkdir(parents=True)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "results.json").write_text("{")
    for name, state in (("nothing", "fresh"), ("started", "resume"), ("damaged", "resume")):
        assert run_status(tmp_path / name) == sweep_state(tmp_path / name, capsys) == state
