"""`dynammo sweep`: the grid of real `dynammo run` subprocesses (tiny digits runs, seconds each),
killed with SIGTERM and started again (finished runs kept untouched, the interrupted one resumed,
the rest run fresh), override routing by the methods' declared keys, failed runs, the bad-input
lines, the SLURM array script (one entry executed by plain bash) and compare_methods.py on top."""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dynammo.cli import main
from dynammo.sweep.local import Sweep, job_env, sweep_lock, threads_per_job
from dynammo.rundir import run_status
from dynammo.sweep.plan import plan_sweep

ROOT = Path(__file__).resolve().parents[1]
# digits at 8 px on a CIFAR ResNet-20, 3 tasks; 3 epochs so that a SIGTERM sent after the first epoch
# lands inside the run's training (the startup, not the training, is most of its ~7 s)
TINY = ["backbone=resnet20", "img_size=8", "init_cls=4", "increment=3", "epochs=3", "batch_size=16",
        "max_train_per_class=30", "plots=false", "tensorboard=false", "eval_openset=false"]


def grid_args(*seeds):
    # T is declared by iCaRL (and BiC, DER, WA), not by Finetune: it must reach the icarl runs only
    return ["-c", "digits", "--methods", "finetune", "icarl", "--seeds", *map(str, seeds), "T=3", *TINY]


GRID = grid_args(0, 1)
RUNS = [("finetune", 0), ("finetune", 1), ("icarl", 0), ("icarl", 1)]


def cli_env(**extra):
    # one OpenMP thread per run: tiny convolutions on 2 oversubscribed cores are far slower with two
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def sweep_in_process(*args, **env):
    """`dynammo sweep` in this process (its runs are still subprocesses): the CLI's main(), its output
    captured; saves a Python startup per call."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}.items():
            mp.setenv(key, value)
        code = main(["sweep", *args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def fingerprint(path: Path):
    return path.stat().st_mtime_ns, path.read_bytes()


def live_processes_mentioning(text: str) -> list:
    """Processes (other than this one) whose command line holds `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def wait_until(condition, proc, what: str, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return
        assert proc.poll() is None, f"the sweep ended before {what}: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"{what} never happened")


def log_has(run_dir: Path, needle: str) -> bool:
    log = run_dir / "log.txt"
    return log.is_file() and needle in log.read_text()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The grid swept once, killed by SIGTERM while its second run trains, and swept again."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    first, second = out / "finetune" / "seed0", out / "finetune" / "seed1"
    proc = subprocess.Popen([sys.executable, "-m", "dynammo", "sweep", *GRID, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env())
    try:
        wait_until(lambda: run_status(first) == "complete" and log_has(second, "task 1/3 train epoch 1/3"),
                   proc, "one run complete and the next one training")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = SimpleNamespace(rc=proc.returncode, stdout=stdout, stderr=stderr,
                             children=live_processes_mentioning(str(out)), second_state=run_status(second),
                             second_results=json.loads((second / "results.json").read_text())
                             if (second / "results.json").is_file() else None)
    first_before = fingerprint(first / "results.json")
    restart = sweep_in_process(*GRID, "--out", str(out))
    return SimpleNamespace(out=out, killed=killed, restart=restart, first_before=first_before)


def test_sigterm_stops_the_children_and_the_same_sweep_finishes_the_work(grid):
    k = grid.killed
    assert k.rc == 130, k.stdout + k.stderr
    assert "SIGTERM: stopping the 1 running run(s)" in k.stdout
    assert "[2/4] interrupted finetune seed 1 (exit 130" in k.stdout
    assert "stopped by SIGTERM" in k.stdout and "2 not started" in k.stdout
    assert k.children == []  # the sweep waited for its run, which saved and exited
    assert k.second_state == "resume"  # a checkpoint (partial.pt or a task's), maybe an interrupted results.json
    if k.second_results is not None:
        assert k.second_results["status"] == "interrupted"

    r = grid.restart
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[1/4] skip   finetune seed 0: already complete (last acc " in r.stdout
    assert "[2/4] start  finetune seed 1 (resume)" in r.stdout
    assert "[3/4] start  icarl seed 0 (fresh)" in r.stdout and "[4/4] start  icarl seed 1 (fresh)" in r.stdout
    assert "sweep: 4 of 4 runs complete (1 skipped as already complete, 1 resumed, 2 run fresh)" in r.stdout
    # the finished run was not run again, nor its results.json rewritten
    assert fingerprint(grid.out / "finetune" / "seed0" / "results.json") == grid.first_before
    assert "resuming" in (grid.out / "finetune" / "seed1" / "log.txt").read_text()
    for method, seed in RUNS:
        assert results(grid.out / method / f"seed{seed}")["status"] == "complete"


def test_grid_layout_configs_and_overrides_only_where_declared(grid):
    assert sorted(p.relative_to(grid.out).as_posix() for p in grid.out.glob("*/seed*")) == \
        [f"{m}/seed{s}" for m, s in RUNS]
    for method, seed in RUNS:
        run_dir = grid.out / method / f"seed{seed}"
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        res = results(run_dir)
        assert (cfg["method"], cfg["seed"], res["method"], res["seed"]) == (method, seed, method, seed)
        assert cfg["protocol"] == "digits" and cfg["epochs"] == 3 and cfg["backbone"] == "resnet20"
        assert (cfg.get("T") == 3) if method == "icarl" else ("T" not in cfg)
        assert res["acc"][-1] == res["last_acc"] and len(res["acc"]) == 3
    assert "note: T=3 is given to icarl only" in grid.restart.stdout


def test_report_of_the_sweep_groups_seeds_by_method(grid):
    rep = json.loads((grid.out / "report" / "report.json").read_text())
    [section] = rep["sections"]
    assert section["protocol"] == "digits"
    rows = {r["method"]: r for r in section["rows"] if r["classifier"] is None}
    assert sorted(rows) == ["finetune", "icarl"]
    for method, row in rows.items():
        assert sorted(row["seeds"]) == [0, 1]
        finals = [results(grid.out / method / f"seed{s}")["last_acc"] for s in (0, 1)]
        assert row["stats"]["last_acc"]["mean"] == pytest.approx(sum(finals) / 2)
    assert "| finetune | 2 |" in grid.restart.stdout  # the report's table, printed


def test_the_same_sweep_again_runs_nothing_and_compare_methods_is_that_sweep(grid, tmp_path, capsys, monkeypatch):
    """benchmarks/compare_methods.py's documented command is a thin call of the same sweep (+ a plot)."""
    before = {d: fingerprint(grid.out / d / "results.json") for d in (f"{m}/seed{s}" for m, s in RUNS)}
    plot = tmp_path / "acc.png"
    script = ROOT / "benchmarks" / "compare_methods.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--protocol", "digits", "--methods", "finetune", "icarl",
                                      "--seeds", "0", "1", "--out", str(grid.out), "--plot", str(plot), "T=3", *TINY])
    runpy.run_path(str(script), run_name="__main__")  # no SystemExit: every run was complete
    stdout = capsys.readouterr().out
    assert stdout.count(" skip   ") == 4 and " start  " not in stdout
    assert {d: fingerprint(grid.out / d / "results.json") for d in before} == before
    assert "| icarl | 2 |" in stdout  # the report's table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_complete_run_made_with_other_values_is_kept_and_the_difference_named(grid):
    plan = plan_sweep(["digits"], ["finetune"], [0], [*TINY, "epochs=2"], grid.out)
    lines = []
    outcomes = Sweep(plan, 1, [], say=lines.append).run()
    assert [o.state for o in outcomes] == ["skipped"]
    assert "note: it was made with epochs=3 (this sweep: 2): kept as it is" in lines[0], lines


def test_slurm_array_script_and_one_entry_run_by_bash(grid, tmp_path):
    out = tmp_path / "grid"
    shutil.copytree(grid.out, out)
    script = tmp_path / "sweep.sbatch"
    argv = ["sweep", *grid_args(0, 1, 2), "--out", str(out), "--jobs", "2", "--emit-slurm", str(script),
            "--gpus-per-task", "1", "--slurm-option=--partition=gpu", "--slurm-option", "time=01:00:00"]
    assert main(argv) == 0  # seeds 0 1 2: 6 entries, finetune seed 2 (entry 2) not run yet
    text = script.read_text()
    for line in ("#!/bin/bash", "#SBATCH --array=0-5%2", "#SBATCH --gpus-per-task=1", "#SBATCH --partition=gpu",
                 "#SBATCH --time=01:00:00", f"#SBATCH --output={(out / 'slurm').resolve()}/%A_%a.log"):
        assert line in text.splitlines(), line
    assert (out / "slurm").is_dir()
    entries = [line.strip() for line in text.splitlines() if line.strip().startswith("fresh=(")]
    assert len(entries) == 6
    for entry, (method, seed) in zip(entries, [(m, s) for m in ("finetune", "icarl") for s in (0, 1, 2)]):
        assert f"-c digits -c {method} --out {out / method / f'seed{seed}'} seed={seed} progress=false" in entry
        assert ("T=3" in entry) == (method == "icarl") and "epochs=3" in entry
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    def entry(index):
        env = cli_env(SLURM_ARRAY_TASK_ID=str(index))
        return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)

    before = fingerprint(out / "finetune" / "seed0" / "results.json")
    done = entry(0)  # complete: exits 0 without work
    assert done.returncode == 0 and "is complete: nothing to do" in done.stdout, done.stderr
    assert fingerprint(out / "finetune" / "seed0" / "results.json") == before
    fresh = entry(2)  # finetune seed 2: run fresh through `dynammo run`
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    res = results(out / "finetune" / "seed2")
    assert (res["status"], res["method"], res["seed"]) == ("complete", "finetune", 2)
    bad = entry(6)
    assert bad.returncode == 2 and "not an entry of this sweep (0-5)" in bad.stderr


def test_failed_runs_do_not_stop_the_others(tmp_path):
    """Runs that fail at once (no data): K at a time, threads split, GPUs round-robin, one line each."""
    out = tmp_path / "failing"
    proc = sweep_in_process("--methods", "finetune", "--seeds", "0", "1", "2", "--jobs", "2", "--devices", "0,1",
                            "--out", str(out), "dataset=mednist", f"data_root={tmp_path / 'no_data'}",
                            OMP_NUM_THREADS="4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stdout.splitlines() if " failed finetune seed " in line]
    assert len(failed) == 3
    for line in failed:
        assert "(exit 2, " in line and "error: MedNIST not found" in line and "log: " in line
    assert "3 failed (finetune seed 0, finetune seed 1, finetune seed 2)" in proc.stdout
    headers = [(out / "finetune" / f"seed{s}" / "sweep.log").read_text().splitlines()[0] for s in (0, 1, 2)]
    assert all("OMP_NUM_THREADS=2 " in h for h in headers)  # 4 CPUs given, 2 runs at a time
    devices = {h.split("CUDA_VISIBLE_DEVICES=")[1].split()[0] for h in headers}
    assert devices == {"0", "1"}
    assert "report not written: no finished run" in proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "nosuch"], "unknown method 'nosuch'"),
    (["-c", "nosuch_protocol", "--methods", "finetune"], "-c nosuch_protocol: no such protocol"),
    (["-c", "finetune", "--methods", "replay"], "-c finetune is a method"),
    (["--methods"], "--methods: give at least one method"),
    (["--methods", "finetune", "--jobs", "0"], "--jobs 0"),
    (["--methods", "finetune", "replay", "T=3"], "'T' is neither a general config key nor a key of the swept methods"),
    (["--methods", "finetune", "epochz=2"], "did you mean 'epochs'"),
    (["--methods", "finetune", "seed=3"], "--seeds"),
    (["--methods", "finetune", "--seeds", "x"], "--seeds: 'x' is not a seed"),
    (["--methods", "finetune", "--devices", "0,,1"], "--devices"),
    (["--methods", "finetune", "--gpus-per-task", "1"], "only go with --emit-slurm"),
    (["--methods", "gem", "lrate=-1"], "method gem: config key 'lrate'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    assert main(["sweep", *argv, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("not a folder")
    assert main(["sweep", "--methods", "finetune", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {out} is a file; give a folder for the sweep's run directories"
    assert out.read_text() == "not a folder" and list(tmp_path.iterdir()) == [out]


def test_threads_split_between_jobs_and_gpus_round_robin():
    assert [threads_per_job(k, cores=8) for k in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert [job_env(slot, 1, ["0", "1"])["CUDA_VISIBLE_DEVICES"] for slot in range(5)] == ["0", "1", "0", "1", "0"]
    assert "CUDA_VISIBLE_DEVICES" not in job_env(0, 2, []) and job_env(0, 2, [])["OMP_NUM_THREADS"] == "2"


def test_state_of_a_run_directory(tmp_path):
    assert run_status(tmp_path / "absent") == "fresh"
    (tmp_path / "logs_only").mkdir()
    (tmp_path / "logs_only" / "sweep.log").write_text("error: no data\n")
    assert run_status(tmp_path / "logs_only") == "fresh"  # a run that failed before writing anything
    for name, status in [("done", "complete"), ("stopped", "interrupted"), ("going", "running"), ("bad", "failed")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"method": "x", "acc_matrix": [], "status": status}))
        assert run_status(tmp_path / name) == ("complete" if status == "complete" else "resume")
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)  # SIGKILLed in its first task
    assert run_status(tmp_path / "killed") == "resume"


def test_state_flag_prints_the_state_and_takes_no_other_option(tmp_path, capsys):
    """`dynammo sweep --state RUN_DIR`, what each SLURM array task asks before it runs."""
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text(json.dumps({"acc_matrix": [], "status": "complete"}))
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)
    for name, state in [("done", "complete"), ("killed", "resume"), ("absent", "fresh")]:
        assert main(["sweep", f"--state={tmp_path / name}"]) == 0
        assert capsys.readouterr().out == state + "\n"
    for extra in (["--methods", "finetune"], ["--jobs", "2"], ["epochs=1"], ["--emit-slurm", str(tmp_path / "s")]):
        assert main(["sweep", "--state", str(tmp_path / "done"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --state RUN_DIR takes no other option"), (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "killed"]
    with pytest.raises(SystemExit) as exc:  # argparse: a sweep folder or one run's state, not both
        main(["sweep", "--state", str(tmp_path / "done"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_second_sweep_on_the_same_folder_is_refused(grid, capsys):
    with sweep_lock(grid.out):  # as a sweep running there holds it
        assert main(["sweep", *GRID, "--out", str(grid.out)]) == 2
    assert "error: another dynammo sweep is running on" in capsys.readouterr().err
