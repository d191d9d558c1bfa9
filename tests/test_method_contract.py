"""The evaluation contract, checked for every registered method (as timm tests every registered
model): a new method file is tested for free, with no line added here.

Per method, one tiny real `dynammo run` (conftest `tiny_run`, shared with the methods' own
end-to-end tests) and then:
- evaluation: after `eval_mode()` no module the method holds is in training mode, and predicting
  changes no weight or buffer;
- the accuracy is identical at eval batch size 1 and 256, and equal to what the run recorded;
- eval_batch_size, a result-neutral key, changes nothing a run trains: two real PODNet runs on
  digits at eval_batch_size 1 and 256 end bitwise alike;
- an interrupted run (stopped after the first batch of task 2) resumed ends exactly where the
  uninterrupted run ends;
- a second run with the same seed, in another process, is identical (results and checkpoint);
- the exported model gives the framework's predictions;
- `dynammo cost` (no training) gives the costs the run recorded.
Then the runner's eval-mode check itself, on deliberately broken methods.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dynammo.cli import main
from dynammo.console import Console
from dynammo.deploy import export_run
from dynammo.engine import Engine
from dynammo.methods import METHODS
from dynammo.methods.base import held_modules, modules_in_training_mode
from dynammo.metrics import ContinualMetrics
from dynammo.protocols import RESULT_NEUTRAL_KEYS
from dynammo.run.build import prepare
from dynammo.run.evaluation import evaluate, evaluate_checkpoint
from dynammo.run.restore import restore_method
from dynammo.rundir import available_checkpoints, load_checkpoint, read_run_config

import method_helpers
from method_helpers import run_task
from test_deploy import check_export_equals_framework

pytestmark = pytest.mark.usefixtures("single_thread")
TESTS = Path(__file__).resolve().parent
QUIET = Console(progress="false", quiet=True)


@pytest.fixture(scope="module", params=METHODS.names())
def name(request):
    """Every registered method; module scope groups each method's tests together."""
    return request.param


def results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def last_checkpoint(run_dir) -> dict:
    found = available_checkpoints(run_dir)
    return load_checkpoint(found[max(found)])


def assert_same(a, b, where="state"):
    """Nested dicts / lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_outcome(run_a, run_b) -> None:
    """Two runs ended identically: every recorded accuracy, and the last checkpoint's model, memory
    and RNG state."""
    ra, rb = results(run_a), results(run_b)
    assert rb["status"] == "complete"
    for key in ("acc_matrix", "acc", "mcr", "task_il_acc", "extra", "task_id_acc", "class_order"):
        assert ra.get(key) == rb.get(key), key
    a, b = last_checkpoint(run_a), last_checkpoint(run_b)
    assert a["task"] == b["task"]
    assert_same(a["state"], b["state"], "state")
    assert_same(a["rng"], b["rng"], "rng")


# ---------------------------------------------------------------- evaluation


def test_eval_mode_reaches_every_module_and_prediction_changes_nothing(name, tiny_run):
    run_dir = tiny_run(name)
    cfg = read_run_config(run_dir)
    _, scenario, engine, _ = prepare(cfg, QUIET)
    method = restore_method(cfg, last_checkpoint(run_dir))  # raises if eval_mode() leaves a module training
    assert modules_in_training_mode(method) == []
    modules = held_modules(method)
    assert "net" in modules
    before = {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}
    engine.apply(method.predict, scenario.test_data_seen(scenario.tasks[-1]))
    assert_same(before, {k: m.state_dict() for k, m in held_modules(method).items()}, "after predict")
    assert modules_in_training_mode(method) == []


def with_eval_batch_size(run_dir, dst, batch_size):
    """A copy of the run (config, results, last checkpoint) whose config says eval_batch_size."""
    dst.mkdir(parents=True)
    (dst / "checkpoints").mkdir()
    found = available_checkpoints(run_dir)
    shutil.copy(found[max(found)], dst / "checkpoints" / found[max(found)].name)
    shutil.copy(run_dir / "results.json", dst / "results.json")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["eval_batch_size"] = batch_size
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def test_accuracy_is_identical_at_eval_batch_size_1_and_256(name, tiny_run, tmp_path):
    """BatchNorm left in training mode, or anything else that mixes the images of a batch, makes
    the accuracy depend on the batch size; the recorded numbers must come back from the checkpoint."""
    run_dir = tiny_run(name)
    r = results(run_dir)
    out = {bs: evaluate_checkpoint(with_eval_batch_size(run_dir, tmp_path / f"bs{bs}", bs), None, QUIET)
           for bs in (1, 256)}
    one, big = out[1], out[256]
    for key in ("acc", "mcr", "task_il_acc", "acc_per_task", "task_id_acc", "extra"):
        assert one[key] == big[key], key
    t = one["task"] - 1
    assert big["acc"] == r["acc"][t] and big["mcr"] == r["mcr"][t]
    assert big["acc_per_task"] == r["acc_matrix"][t][: t + 1]
    assert big["task_il_acc"] == (r["task_il_acc"][t] if r.get("task_il_acc") else None)
    assert big["task_id_acc"] == (r["task_id_acc"][t] if r.get("task_id_acc") else None)
    assert big["extra"] == {k: v["acc"][t] for k, v in (r.get("extra") or {}).items()}


# PODNet on digits in fp32 (on a CPU with AVX512-BF16 the default bf16 path rounds the difference
# away), 5 tasks, herding and k-means proxy imprinting between tasks: features computed between tasks
# feed training, and a fp32 convolution's output differs by ~1e-6 between batches of 1 and of 256
# images. When those passes ran at eval_batch_size, eval_batch_size=1 chose other exemplars and changed
# the last task's accuracy from 75.3 to 57.5 (commit c535df6).
NEUTRALITY_RUN = ["method=podnet", "dataset=digits", "max_train_per_class=30", "epochs=1", "memory_size=40", "seed=5",
                  "amp=false", "progress=false", "plots=false", "tensorboard=false", "eval_openset=false"]


def test_eval_batch_size_changes_nothing_a_run_trains(run_in_process, tmp_path):
    """The passes that feed training (herding features, imprinted weights, class means) run at the
    engine's fixed internal batch; eval_batch_size only sizes the evaluation's batches."""
    assert "eval_batch_size" in RESULT_NEUTRAL_KEYS  # a resume or a sweep may change it: it must be neutral
    for bs in (1, 256):
        assert run_in_process("run", "--out", tmp_path / f"bs{bs}", *NEUTRALITY_RUN, f"eval_batch_size={bs}") == 0
    same_outcome(tmp_path / "bs1", tmp_path / "bs256")


# ---------------------------------------------------------------- resume and reproducibility


def test_resume_after_an_interruption_mid_task_equals_the_uninterrupted_run(run_in_process, name, tiny_run, tmp_path, monkeypatch):
    """Stopped (as by SIGINT) after the first batch of task 2's first training stage, resumed with
    `dynammo resume`: results, model, memory and RNG end as in the uninterrupted run. A method that
    trains nothing after task 1 (SimpleCIL, APER, RanPAC: its recorded budget of task 2 is empty) is
    stopped in task 1's first training stage instead."""
    reference = tiny_run(name)
    task = 2 if results(reference)["budget"][1] else 1
    out = tmp_path / "cut"
    real_fit = Engine.fit
    stopped = []

    def stop_in_task(self, *a, **k):
        if self.task_label.startswith(f"task {task}/") and not stopped:
            stopped.append(self.task_label)
            self.stop_requested = "SIGINT"  # what the signal handler does: stop after this batch
        return real_fit(self, *a, **k)

    monkeypatch.setattr(Engine, "fit", stop_in_task)
    assert run_in_process("run", "--out", str(out), *method_helpers.tiny_run_args(name)) == 130
    monkeypatch.undo()
    assert stopped
    assert (out / "checkpoints" / "task_0.pt").is_file() == (task == 2)  # task 1 had no checkpoint yet
    assert (out / "checkpoints" / "partial.pt").is_file(), f"the stop did not land inside task {task}"
    if task == 2:  # a run stopped in task 1 has no results.json yet
        assert results(out)["status"] == "interrupted"
    assert run_in_process("resume", str(out)) == 0
    same_outcome(reference, out)
    assert not (out / "checkpoints" / "partial.pt").exists()


SECOND_RUNS = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from dynammo.cli import main
from method_helpers import tiny_run_args
for name in sys.argv[3:]:
    rc = main(["run", "--out", f"{sys.argv[2]}/{name}", *tiny_run_args(name)])
    if rc:
        sys.exit(f"the second run of {name} failed with exit status {rc}")
"""


@pytest.fixture(scope="module")
def second_runs(cli, request, tmp_path_factory):
    """The tiny run of every method this session tests, again, in ONE other process (another hash
    seed, fresh global state): {method: run dir}."""
    names = []
    for item in request.session.items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if item.module is sys.modules[__name__] and "second_runs" in item.fixturenames and params \
                and params.get("name") not in names:
            names.append(params["name"])
    root = tmp_path_factory.mktemp("second_runs")
    proc = cli.python("-c", SECOND_RUNS, TESTS, root, *names, env=cli.env(PYTHONHASHSEED="random"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {n: root / n for n in names}


def test_a_second_run_with_the_same_seed_is_identical(name, tiny_run, second_runs):
    same_outcome(tiny_run(name), second_runs[name])


# ---------------------------------------------------------------- export and cost


def test_export_gives_the_framework_predictions(name, tiny_run, tmp_path):
    run_dir = tiny_run(name)
    meta = export_run(run_dir, tmp_path / "model.pt2")
    assert meta["method"] == name and meta["task"] == len(results(run_dir)["tasks"])
    check_export_equals_framework(run_dir, tmp_path / "model.pt2")


def test_cost_command_gives_the_recorded_cost(name, tiny_run, capsys):
    """`dynammo cost` builds the structure task by task without data; its FLOPs, parameters and
    memory budget are what the run measured."""
    run_dir = tiny_run(name)
    capsys.readouterr()
    assert main(["cost", "-c", str(run_dir / "config.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    recorded = results(run_dir)["cost"]
    assert len(rows) == len(recorded)
    for row, rec in zip(rows, recorded):
        assert row["inference_gflops"] == pytest.approx(rec["inference_gflops"], rel=1e-9)
        assert row["params_total"] == rec["params_total"]
        # every class has more training images than its quota, so the memory is exactly the budget
        assert row["memory_exemplars"] == rec["memory_exemplars"]
        # of raw uint8 8x8 grayscale images; a method may store more per exemplar (DER++: logits)
        assert row["memory_bytes"] == 8 * 8 * row["memory_exemplars"] <= rec["memory_bytes"]


# ---------------------------------------------------------------- the runner's eval-mode check


def evaluate_task_1(m):
    tasks = m.scenario.tasks
    return evaluate(m.cfg, m, m.engine, m.scenario, tasks[0], ContinualMetrics([(t.start, t.end) for t in tasks]))


@pytest.fixture
def trained_replay():
    m = method_helpers.make_method("replay")
    run_task(m, m.scenario.tasks[0])
    return m


def first_batchnorm(net):
    return next((n, mod) for n, mod in net.named_modules() if isinstance(mod, torch.nn.BatchNorm2d))


def test_batchnorm_left_training_is_a_clear_error(trained_replay):
    m = trained_replay
    evaluate_task_1(m)  # a correct method evaluates
    bn_name, bn = first_batchnorm(m.net)
    real_eval_mode = m.eval_mode

    def eval_mode_that_forgets_a_batchnorm():
        real_eval_mode()
        bn.train()

    m.eval_mode = eval_mode_that_forgets_a_batchnorm
    with pytest.raises(RuntimeError, match=rf"method 'replay' \(Replay\) left modules in training mode at "
                                           rf"evaluation: net\.{bn_name} \(BatchNorm2d\)"):
        evaluate_task_1(m)


def test_modules_outside_net_are_checked_too(trained_replay):
    m = trained_replay
    m.teacher = copy.deepcopy(m.net).train()  # e.g. an old network the method forgot in its eval_mode
    with pytest.raises(RuntimeError, match=r"teacher \(IncrementalNet\)"):
        evaluate_task_1(m)
    m.teacher.eval()
    m.old_nets = [copy.deepcopy(m.net).eval(), copy.deepcopy(m.net.head).train()]
    with pytest.raises(RuntimeError, match=r"old_nets\[1\]"):
        evaluate_task_1(m)
    m.old_nets = {"shared": m.net}  # the same modules under two names: checked (and named) once
    assert modules_in_training_mode(m) == []
    m.net.backbone.train()
    left = modules_in_training_mode(m)
    assert left and all(p.startswith("net.backbone") for p in left)


def test_restore_export_and_cost_refuse_a_method_that_leaves_a_module_training(tiny_run, tmp_path, monkeypatch,
                                                                               capsys):
    run_dir = tiny_run("replay")
    cls = METHODS.get("replay")
    real_eval_mode = cls.eval_mode

    def broken(self):
        real_eval_mode(self)
        first_batchnorm(self.net)[1].train()

    monkeypatch.setattr(cls, "eval_mode", broken)
    cfg = read_run_config(run_dir)
    with pytest.raises(RuntimeError, match="left modules in training mode"):
        restore_method(cfg, last_checkpoint(run_dir))
    with pytest.raises(RuntimeError, match="left modules in training mode"):
        export_run(run_dir, tmp_path / "model.pt2")
    assert not (tmp_path / "model.pt2").exists()
    with pytest.raises(RuntimeError, match="left modules in training mode"):
        main(["cost", *method_helpers.tiny_run_args("replay"), "--json"])
