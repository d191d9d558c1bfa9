"""benchmarks/gpu_check.py: its CPU dry run as a real subprocess (what CI runs so that the GPU check
does not rot), and its step machinery (failures recorded, later steps still run, the budget)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dynammo.methods import METHODS
from method_helpers import needs_vit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))  # where the script finds its steps package

from gpu_check_steps.common import STEP_NAMES, Check, Settings, Step, now, row_status  # noqa: E402
from gpu_check_steps.methods import matrix_gap, method_protocol, method_run_args, step_methods  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(cli, tmp_path_factory):
    """One dry run of every step; the speed step is given a backbone that does not exist beside a
    real one, so one of its rows fails while its other row and every later step run."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = cli.python(SCRIPT, "--dry-run", "--out", out, "--budget-s", "900", "--speed-models", "resnet20@8:16:1",
                      "no_such_backbone@8:16:1", env=cli.env(DYNAMMO_CPU_BF16="0"), timeout=900)
    record = json.loads((out / "gpu_check.json").read_text())
    return proc, record, (out / "gpu_check.md").read_text()


def steps_of(record) -> dict:
    return {st["name"]: st for st in record["steps"]}


def test_dry_run_runs_every_registered_method_and_records_the_failed_step(dry_run):
    proc, record, md = dry_run
    assert proc.returncode == 1, proc.stderr[-3000:]  # one step failed (on purpose): exit status 1
    assert record["mode"] == "dry-run" and record["environment"]["device"] == "cpu"
    assert [st["name"] for st in record["steps"]] == list(STEP_NAMES)
    steps = steps_of(record)
    assert record["summary"] == {"ok": 4, "failed": 1, "skipped": 0}

    # every registered method ran twice (auto and fp32) and completed; on the CPU with the bf16 probe
    # pinned off both runs are the same fp32 computation, so their accuracy matrices are identical
    methods = steps["methods"]
    assert methods["status"] == "ok", methods["reason"]
    assert [r["name"] for r in methods["rows"]] == METHODS.names()
    for r in methods["rows"]:
        assert r["status"] == "ok", (r["name"], r.get("reason"))
        tasks = len(r["auto"]["acc_matrix"])
        assert tasks >= 2 and all(len(row) == tasks for row in r["auto"]["acc_matrix"])
        assert r["auto"]["acc_matrix"] == r["fp32"]["acc_matrix"], r["name"]
        assert (r["gap_max"], r["gap_mean"]) == (0, 0)
        assert r["auto"]["compute"].startswith("fp32, contiguous")
        if needs_vit(r["name"]):
            assert r["protocol"] == "digits_vit"
        assert f"| {r['name']} | {r['protocol']} | ok |" in md

    # the exported DynaMMo models, through `dynammo predict` and as programs, give the framework's decisions
    export = steps["export"]
    assert export["status"] == "ok", export["reason"]
    assert len(export["rows"]) == 4
    assert all(r["agreement"] == 1.0 and r["conf_gap"] <= 1e-4 and r["images"] > 0 for r in export["rows"])

    # the speed step: the impossible backbone is its failed row, named with its reason; the real one measured
    speed = steps["speed"]
    assert speed["status"] == "failed"
    assert "no_such_backbone@8:16:1" in speed["reason"] and "unknown backbone" in speed["reason"]
    real, impossible = speed["rows"]
    assert impossible["status"] == "failed" and "no_such_backbone" in impossible["reason"]
    assert real["status"] == "ok" and real["framework_img_s"] > 0 and real["bare_img_s"] > 0
    assert real["ratio"] == pytest.approx(real["framework_img_s"] / real["bare_img_s"], rel=1e-2)
    assert "| speed | failed |" in md

    # the steps after it still ran
    loader = steps["loader"]
    assert loader["status"] == "ok", loader["reason"]
    source, alone, from_files, from_memory = loader["rows"]
    assert source["images"] > 0 and all(r["img_s"] > 0 for r in (alone, from_files, from_memory))
    assert source["files_over_memory"] == pytest.approx(from_files["img_s"] / from_memory["img_s"], rel=1e-2)
    latency = steps["latency"]
    assert latency["status"] == "ok", latency["reason"]
    by_t = {r["tasks"]: r for r in latency["rows"]}
    assert sorted(by_t) == [1, 5, 10]
    # counted FLOPs: ACL runs one path per task, DynaMMo one merged path whatever T
    assert by_t[10]["acl_gflops"] > 5 * by_t[1]["acl_gflops"]
    assert by_t[10]["dynammo_gflops"] == pytest.approx(by_t[1]["dynammo_gflops"], rel=0.01)
    assert all(r["acl_ms_batch1"] > 0 and r["dynammo_ms_batch1"] > 0 for r in by_t.values())
    assert "| 10 |" in md


def fake_step(name, rows=None, error=None, min_s=0.0):
    def run(check, deadline):
        if error:
            raise error
        return rows

    return Step(name, f"fake {name}", 1.0, run, min_s)


def test_a_failing_step_is_recorded_with_its_reason_and_the_next_steps_still_run(tmp_path):
    settings = Settings(out=str(tmp_path), device="cpu", budget_s=60, steps=["a", "b", "c", "d"], fail="c")
    check = Check(settings)
    record = check.run([fake_step("a", error=ValueError("broken\nsecond line")),
                        fake_step("b", rows=[{"name": "x", "status": "ok"}, {"name": "y", "status": "failed",
                                                                             "reason": "bad y"}]),
                        fake_step("c", rows=[{"name": "z", "status": "ok"}]),
                        fake_step("d", rows=[{"name": "w", "status": "ok"}])])
    steps = steps_of(record)
    assert (steps["a"]["status"], steps["a"]["reason"]) == ("failed", "ValueError: broken")
    assert (steps["b"]["status"], steps["b"]["reason"]) == ("failed", "1 of 2 failed: y (bad y)")
    assert (steps["c"]["status"], steps["c"]["reason"]) == ("failed", "RuntimeError: failure injected with --fail c")
    assert steps["d"]["status"] == "ok"
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["summary"] == {"ok": 1, "failed": 3, "skipped": 0}
    assert "| a | failed |" in (tmp_path / "gpu_check.md").read_text()


def test_steps_that_no_longer_fit_the_budget_are_skipped(tmp_path):
    settings = Settings(out=str(tmp_path), device="cpu", budget_s=30, steps=["a", "b"])
    record = Check(settings).run([fake_step("a", rows=[{"name": "x", "status": "ok"}]),
                                            fake_step("b", rows=[{"name": "y", "status": "ok"}], min_s=120)])
    steps = steps_of(record)
    assert steps["a"]["status"] == "ok"
    assert steps["b"]["status"] == "skipped" and steps["b"]["reason"].startswith("budget:")
    assert steps["b"]["rows"] == []


def test_a_step_whose_rows_were_all_skipped_is_skipped():
    rows = [{"name": "x", "status": "skipped", "reason": "memory: 4 GiB free"}]
    assert row_status(rows) == ("skipped", "memory: 4 GiB free")
    assert row_status(rows + [{"name": "y", "status": "ok"}]) == ("ok", "1 of 2 skipped (memory: 4 GiB free)")


def test_matrix_gap_compares_the_entries_both_matrices_define():
    a = [[90.0, None], [80.0, 70.0]]
    b = [[85.0, None], [80.0, 76.0]]
    assert matrix_gap(a, b) == (6.0, pytest.approx(11.0 / 3))


def test_each_method_runs_its_shipped_protocol_with_every_stage_cut_short():
    assert method_protocol("l2p") == "digits_vit"
    assert method_protocol("replay") == "digits"
    args = method_run_args("acl", Settings(out="x", epochs=2), "false")
    assert args[:4] == ["-c", "digits", "-c", "acl"]
    assert {"epochs=2", "epochs_finetune=2", "backbone_epochs=2", "amp=false", "device=cuda"} <= set(args)


@pytest.mark.e2e  # its worker process is started inside gpu_check, out of the tier rules' sight
def test_methods_without_a_usable_device_fail_each_with_the_reason(tmp_path):
    """A worker that cannot start (device cuda on a machine without one) fails every method with its
    reason at once instead of being started again per method."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    settings = Settings(out=str(tmp_path), device="cuda", budget_s=120, methods=["replay", "finetune"])
    check = Check(settings)
    try:
        rows = step_methods(check, now() + 120)
    finally:
        shutil.rmtree(check.work)
    assert [r["name"] for r in rows] == ["replay", "finetune"]
    for r in rows:
        assert r["status"] == "failed" and r["reason"].startswith("the worker process died (exit status 1): ")
        assert "cuda" in r["reason"].lower() or "nvidia" in r["reason"].lower()
