"""Open-set detection (AUROC, FPR at 95% TPR, AUPR-In/-Out) and calibration (ECE) metrics: tiny
score vectors worked out by hand, a cross-check against scikit-learn on random vectors with ties,
and real tiny runs: the fields in results.json, recomputed from the checkpoints' predictions, and
the accuracy metrics unchanged by them."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from dynammo import openset
from dynammo.metrics import ContinualMetrics
from dynammo.models.heads import min_others
from dynammo.openset import (aupr_in, aupr_out, auroc, average_ranks, expected_calibration_error, fpr_at_tpr,
                             known_score, max_softmax, open_set_metrics)

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- hand-computed
def test_perfect_separation():
    known, unknown = [0.9, 0.8], [0.3, 0.1]
    # every known score above every unknown one: 4 of 4 pairs -> AUROC 1
    assert auroc(known, unknown) == 1.0
    # thresholds from the top: 0.9 (TPR 1/2, FPR 0), 0.8 (TPR 1 >= 0.95, FPR 0) -> 0
    assert fpr_at_tpr(known, unknown) == 0.0
    # AUPR-In: 0.9: P 1, R 1/2; 0.8: P 1, R 1 -> 1/2 * 1 + 1/2 * 1 = 1
    assert aupr_in(known, unknown) == 1.0
    # AUPR-Out (unknown positive, scores negated): -0.1, -0.3 come first -> 1
    assert aupr_out(known, unknown) == 1.0


def test_inverted_separation():
    known, unknown = [0.1, 0.2], [0.8, 0.9]
    # no pair has the known score above -> 0
    assert auroc(known, unknown) == 0.0
    # 0.9 (FP 1), 0.8 (FP 2), 0.2 (TP 1: TPR 1/2), 0.1 (TP 2: TPR 1 >= 0.95, FP 2 of 2) -> FPR 1
    assert fpr_at_tpr(known, unknown) == 1.0
    # AUPR-In: 0.2: P = 1/3, R = 1/2; 0.1: P = 2/4, R = 1 -> 1/2 * 1/3 + 1/2 * 1/2 = 5/12
    assert aupr_in(known, unknown) == pytest.approx(5 / 12)
    # AUPR-Out: positives -0.8, -0.9 below negatives -0.1, -0.2: the same arithmetic -> 5/12
    assert aupr_out(known, unknown) == pytest.approx(5 / 12)


def test_ties():
    known, unknown = [0.9, 0.5, 0.5], [0.5, 0.2]
    # pairs (known, unknown): (0.9, 0.5) 1, (0.9, 0.2) 1, (0.5, 0.5) 1/2 twice, (0.5, 0.2) 1 twice -> 5/6;
    # by ranks: 0.2 -> 1, the three 0.5 -> (2+3+4)/3 = 3, 0.9 -> 5; U = 5+3+3 - 3*4/2 = 5; 5 / (3*2)
    assert auroc(known, unknown) == pytest.approx(5 / 6)
    assert average_ranks(np.array([0.9, 0.5, 0.5, 0.5, 0.2])).tolist() == [5.0, 3.0, 3.0, 3.0, 1.0]
    # thresholds: 0.9 (TP 1, FP 0, TPR 1/3), 0.5 (one threshold for the tie: TP 3, FP 1, TPR 1) -> FPR 1/2
    assert fpr_at_tpr(known, unknown) == pytest.approx(0.5)
    # AUPR-In: 0.9: P 1, R 1/3; 0.5: P 3/4, R 1 -> 1/3 * 1 + 2/3 * 3/4 = 5/6
    assert aupr_in(known, unknown) == pytest.approx(5 / 6)
    # AUPR-Out: -0.2 (TP 1, FP 0: P 1, R 1/2), -0.5 (TP 2, FP 2: P 1/2, R 1), -0.9 -> 1/2 + 1/2 * 1/2 = 3/4
    assert aupr_out(known, unknown) == pytest.approx(0.75)


def test_all_scores_equal():
    # one threshold holding everything: every pair a tie -> 1/2; TPR 1 at FPR 1; precision = 2/5 at recall 1
    assert auroc([0.4, 0.4], [0.4, 0.4, 0.4]) == 0.5
    assert fpr_at_tpr([0.4, 0.4], [0.4, 0.4, 0.4]) == 1.0
    assert aupr_in([0.4, 0.4], [0.4, 0.4, 0.4]) == pytest.approx(2 / 5)


def test_fpr95_is_taken_at_the_first_threshold_reaching_95_percent():
    known = np.arange(1, 21, dtype=float)  # 20 known scores 1..20
    unknown = [0.5, 1.5, 18.5]
    # at threshold 2 the scores 2..20 pass: 19 / 20 = 0.95 >= 0.95, and of the unknown only 18.5 -> 1/3
    # (a strict TPR > 0.95 would go on to threshold 1: 18.5 and 1.5 -> 2/3)
    assert fpr_at_tpr(known, unknown) == pytest.approx(1 / 3)
    # AUROC: 18.5 is below 2 of the 20 known, 1.5 below 19, 0.5 below all 20 -> (2 + 19 + 20) / 60
    assert auroc(known, unknown) == pytest.approx(41 / 60)


def test_ece_by_hand():
    conf = [0.95, 0.95, 0.65, 0.65, 0.65, 0.65, 0.25]
    correct = [1, 0, 1, 1, 1, 0, 0]
    # bins of width 1/15: 0.95 in (14/15, 1], 0.65 in (9/15, 10/15], 0.25 in (3/15, 4/15]
    # 2/7 * |1/2 - 0.95| + 4/7 * |3/4 - 0.65| + 1/7 * |0 - 0.25| = (0.9 + 0.4 + 0.25) / 7
    assert expected_calibration_error(conf, correct) == pytest.approx(1.55 / 7)
    # one bin averages before the difference: 0.61 and 0.66 share (0.6, 0.667]: |1/2 - 0.635| = 0.135
    # (two bins would give 1/2 * 0.39 + 1/2 * 0.66 = 0.525)
    assert expected_calibration_error([0.61, 0.66], [1, 0]) == pytest.approx(0.135)
    # perfectly calibrated: always right at confidence 1, half right at 0.5; 0 goes into the first bin
    assert expected_calibration_error([1.0, 1.0, 0.5, 0.5], [1, 1, 1, 0]) == 0.0
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == 0.0
    # always wrong at confidence 0.9 -> 0.9
    assert expected_calibration_error(torch.tensor([0.9, 0.9]), torch.tensor([False, False])) == pytest.approx(0.9)


def test_open_set_metrics_need_both_kinds():
    assert open_set_metrics([0.5], []) is None
    assert open_set_metrics([], [0.5]) is None
    assert open_set_metrics([0.9, 0.8], [0.3, 0.1]) == {"auroc": 1.0, "fpr95": 0.0, "aupr": 1.0, "aupr_out": 1.0}


def test_the_scores():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    # max softmax: e^2 / (e^2 + 1) and 1/2
    torch.testing.assert_close(max_softmax(logits), torch.tensor([np.e**2 / (np.e**2 + 1), 0.5], dtype=torch.float32))
    torch.testing.assert_close(known_score({"logits": logits}), max_softmax(logits))
    assert known_score({"logits": logits, "known_score": torch.tensor([0.1, 0.2])}).tolist() == pytest.approx([0.1, 0.2])
    # min-others over two heads of 1 + "others" outputs: p(others) of head 0 = 1/(1+e), of head 1 = 1/2
    head0, head1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    out = min_others([head0, head1])
    # the known-score is 1 - min(1/(1+e), 1/2) = e/(1+e)
    assert out["known_score"].item() == pytest.approx(np.e / (1 + np.e), rel=1e-6)
    assert out["task_id"].item() == 0


# ---------------------------------------------------------------- against scikit-learn
@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn_on_random_vectors(seed):
    rng = np.random.default_rng(seed)
    n1, n0 = rng.integers(1, 60, size=2)
    # rounded to one decimal: many ties, within and across the two kinds
    known = np.round(rng.normal(0.6, 0.2, n1), 1)
    unknown = np.round(rng.normal(0.4, 0.2, n0), 1)
    y = np.r_[np.ones(n1), np.zeros(n0)]
    s = np.r_[known, unknown]
    assert auroc(known, unknown) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert fpr_at_tpr(known, unknown) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    assert aupr_in(known, unknown) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert aupr_out(known, unknown) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_ece_against_a_per_sample_loop(seed):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.05, 1.0, 200)
    correct = rng.uniform(size=200) < conf ** 2
    bins = {}
    for c, k in zip(conf, correct):  # bin b holds (b/15, (b+1)/15]
        b = min(max(int(np.ceil(c * 15)) - 1, 0), 14)
        bins.setdefault(b, []).append((c, k))
    want = sum(len(v) / 200 * abs(np.mean([k for _, k in v]) - np.mean([c for c, _ in v])) for v in bins.values())
    assert expected_calibration_error(conf, correct) == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------- results.json and summary.json
def test_metrics_summary_lists_and_averages():
    m = ContinualMetrics([(0, 2), (2, 4)])
    m.openset_score = "max_softmax"
    m.add(0, [0, 1], [0, 1])  # each task's row, then its scores, as the runner adds them
    m.add_scores(10.0, {"auroc": 80.0, "fpr95": 50.0, "aupr": 70.0, "aupr_out": 60.0, "n_known": 2, "n_unknown": 2})
    m.add(1, [0, 1, 2, 3], [0, 1, 2, 3])
    m.add_scores(20.0, None)
    s = m.summary()
    assert s["ece"] == [10.0, 20.0] and s["avg_ece"] == 15.0 and s["last_ece"] == 20.0
    o = s["openset"]
    assert o["score"] == "max_softmax" and o["positive"] == "known"
    assert o["auroc"] == [80.0, None] and o["fpr95"] == [50.0, None] and o["aupr"] == [70.0, None]
    assert o["n_known"] == [2, None] and o["avg_auroc"] == 80.0 and o["avg_aupr_out"] == 60.0
    # round trip through a checkpoint's state; a state of an older version (no such keys) loads too
    again = ContinualMetrics(m.bounds)
    again.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert again.summary() == s
    # a checkpoint of an older version (no such keys) after task 1, resumed: None for task 1
    older = ContinualMetrics(m.bounds)
    old_state = {k: v for k, v in m.state_dict().items() if k not in ("ece", "openset", "openset_score")}
    older.load_state_dict({**old_state, "acc_matrix": m.acc_matrix[:1], "acc": m.acc[:1], "mcr": m.mcr[:1]})
    assert "ece" not in older.summary()
    older.openset_score = "max_softmax"
    older.add(1, [0, 1, 2, 3], [0, 1, 2, 3])
    older.add_scores(5.0, None)
    assert older.ece == [None, 5.0] and older.summary()["openset"]["auroc"] == [None, None]
    # off: no open-set block
    m.openset_score = None
    assert m.summary()["openset"] is None


def test_summary_over_seeds():
    from dynammo.run.experiment import summarize

    def run(seed, ece, auroc):
        return {"method": "finetune", "dataset": "digits", "seed": seed, "avg_acc": 50.0, "last_acc": 40.0,
                "avg_ece": ece, "last_ece": ece,
                "openset": {"score": "max_softmax", "positive": "known", "avg_auroc": auroc, "avg_fpr95": 90.0,
                            "avg_aupr": 60.0, "avg_aupr_out": 40.0}}

    s = summarize([run(1, 10.0, 70.0), run(2, 14.0, 80.0)])
    assert s["avg_ece"]["mean"] == 12.0 and s["avg_ece"]["std"] == pytest.approx(np.std([10, 14], ddof=1))
    assert s["openset"]["score"] == "max_softmax"
    assert s["openset"]["avg_auroc"]["mean"] == 75.0
    assert s["openset"]["avg_auroc"]["std"] == pytest.approx(np.std([70, 80], ddof=1))
    assert s["openset"]["avg_fpr95"]["std"] == 0.0
    # a seed with open-set evaluation off: no open-set block
    off = run(3, 12.0, 0.0)
    off["openset"] = None
    assert "openset" not in summarize([run(1, 10.0, 70.0), off])


# ---------------------------------------------------------------- real tiny runs
ACCURACY_FIELDS = ("acc_matrix", "acc", "mcr", "task_il_acc", "avg_acc", "last_acc", "avg_mcr", "last_mcr",
                   "forgetting", "bwt", "confusion", "task_id_acc")


@pytest.mark.parametrize("name,score", [("finetune", "max_softmax"), ("acl", "others")])
def test_results_json_has_the_fields(tiny_run, name, score):
    r = json.loads((tiny_run(name) / "results.json").read_text())
    T = len(r["tasks"])
    assert T == 3
    o = r["openset"]
    assert o["score"] == score and o["positive"] == "known"
    test_counts = [r["class_counts"]["test"][c] for c in r["class_order"]]
    for key in ("auroc", "fpr95", "aupr", "aupr_out", "n_known", "n_unknown"):
        assert len(o[key]) == T and o[key][-1] is None, key  # nothing is unseen after the last task
    for j in range(T - 1):
        end = sum(len(t) for t in r["tasks"][: j + 1])
        assert o["n_known"][j] == sum(test_counts[:end]) and o["n_unknown"][j] == sum(test_counts[end:])
        for key in ("auroc", "fpr95", "aupr", "aupr_out"):
            assert 0.0 <= o[key][j] <= 100.0
    assert o["avg_auroc"] == pytest.approx(np.mean(o["auroc"][:-1]))
    assert len(r["ece"]) == T and all(0.0 <= e <= 100.0 for e in r["ece"])
    assert r["avg_ece"] == pytest.approx(np.mean(r["ece"])) and r["last_ece"] == r["ece"][-1]


def _predictions(method, engine, data, fn=None):
    """predict (or fn) over data in batches of 256, as the runner's evaluation batches."""
    outs = []
    for start in range(0, len(data), 256):
        idx = torch.arange(start, min(start + 256, len(data)))
        with torch.no_grad():
            outs.append((fn or method.predict)(engine.test_tf(data.get(idx))))
    return {k: torch.cat([o[k].float() for o in outs]) for k in outs[0]}


def nme_probabilities(method, engine, data):
    """iCaRL's NME probabilities by hand: softmax over minus the squared Euclidean distances of the
    L2-normalised features to the class means (nme_temperature 1)."""
    def probs(x):
        f = torch.nn.functional.normalize(method.net.features(x), dim=1)
        return {"p": torch.softmax(-torch.cdist(f.double(), method.class_means.double()) ** 2, dim=1)}

    return _predictions(method, engine, data, probs)["p"]


@pytest.mark.parametrize("name", ["finetune", "acl", "icarl"])
def test_the_recorded_metrics_are_those_of_the_checkpoints_predictions(tiny_run, name):
    """From each task's checkpoint, by plain loops and scikit-learn: the accuracy, the ECE and the
    open-set metrics results.json recorded. For iCaRL they are the headline NME classifier's, not
    its CNN head's (whose predictions differ from NME's in this run)."""
    from dynammo.rundir import load_checkpoint, read_run_config
    from dynammo.console import Console
    from dynammo.run.build import prepare

    run = tiny_run(name)
    r = json.loads((run / "results.json").read_text())
    assert r["classifier"] == {"finetune": "head", "acl": "min-others", "icarl": "nme"}[name]
    assert r["openset"]["classifier"] == r["classifier"] and r["confidence"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [row["classifier"] for row in rows] == [r["classifier"]] * len(r["acc"])
    cnn_differs, cnn_ece = [], []
    cfg = read_run_config(run)
    _, scenario, engine, method = prepare(cfg, Console(progress="false", quiet=True))
    for task in scenario.tasks:
        fresh = prepare(cfg, Console(progress="false", quiet=True))[3] if task.id else method
        fresh.load_state_dict(load_checkpoint(run / "checkpoints" / f"task_{task.id}.pt")["state"])
        fresh.eval_mode()
        seen = scenario.test.of_classes(range(task.end))
        out = _predictions(fresh, engine, seen)
        pred = out["pred"].long() if "pred" in out else out["logits"].argmax(1)
        y = seen.labels
        assert r["acc"][task.id] == pytest.approx(100.0 * (pred == y).double().mean().item(), abs=1e-9)
        if "task_id" in out:  # min-others: the chosen head's probability of the class
            conf = out["task_il_logits"].gather(1, pred[:, None]).squeeze(1)
        elif name == "icarl":
            nme = nme_probabilities(fresh, engine, seen)
            conf = nme.max(1).values
            assert torch.equal(nme.argmax(1), pred)  # the headline is NME
            cnn_differs.append(bool((out["pred_cnn"].long() != pred).any()))
            cnn_conf = torch.softmax(out["logits"], 1).max(1).values
            cnn_ece.append(100 * expected_calibration_error(cnn_conf, out["pred_cnn"].long() == y))
        else:
            conf = torch.softmax(out["logits"], 1).max(1).values
        tol = 1e-4 if name == "icarl" else 1e-6  # the hand distances in float64, the method's in float32
        assert r["ece"][task.id] == pytest.approx(100 * expected_calibration_error(conf, pred == y), abs=tol)
        if task.id == len(scenario) - 1:
            continue
        unseen = scenario.test.of_classes(range(task.end, scenario.tasks[-1].end))
        out_u = _predictions(fresh, engine, unseen)
        if name == "acl":  # 1 - min over the heads of p(others), from the raw head outputs
            def others(x):
                return {"p": torch.stack([torch.softmax(h, 1)[:, -1] for h in fresh.net(x)], 1)}

            s_known, s_unknown = (1 - _predictions(fresh, engine, d, others)["p"].min(1).values for d in (seen, unseen))
        elif name == "icarl":  # the max of the NME probabilities
            s_known, s_unknown = (nme_probabilities(fresh, engine, d).max(1).values for d in (seen, unseen))
        else:
            s_known = torch.softmax(out["logits"], 1).max(1).values
            s_unknown = torch.softmax(out_u["logits"], 1).max(1).values
        yk = np.r_[np.ones(len(s_known)), np.zeros(len(s_unknown))]
        s = np.r_[s_known.numpy(), s_unknown.numpy()]
        # NME's max probabilities lie close together: float32 against float64 reorders a few near-ties
        tol = 1e-2 if name == "icarl" else 1e-4
        assert r["openset"]["auroc"][task.id] == pytest.approx(100 * roc_auc_score(yk, s), abs=tol)
        assert r["openset"]["aupr"][task.id] == pytest.approx(100 * average_precision_score(yk, s), abs=tol)
        if name == "icarl":  # the CNN head's max-softmax would give another AUROC
            cnn = np.r_[torch.softmax(out["logits"], 1).max(1).values.numpy(),
                        torch.softmax(out_u["logits"], 1).max(1).values.numpy()]
            assert abs(100 * roc_auc_score(yk, cnn) - r["openset"]["auroc"][task.id]) > 10 * tol
    if name == "icarl":
        assert any(cnn_differs)  # two classifiers that disagree: the test tells whose scores are used
        assert r["ece"] != pytest.approx(cnn_ece, abs=1e-3)  # not the CNN head's calibration


def test_accuracy_and_training_are_the_same_with_open_set_evaluation_off(run_in_process, tiny_run, tmp_path):
    """eval_openset=false: bit for bit the same accuracies, cost (FLOPs, parameters, images) and
    trained weights; only the open-set block is gone (ECE stays: it needs no extra pass)."""
    from dynammo.rundir import load_checkpoint
    from dynammo.cli import main
    from method_helpers import tiny_run_args

    on = tiny_run("finetune")
    off = tmp_path / "off"
    assert run_in_process("run", "--out", str(off), *tiny_run_args("finetune", eval_openset="false")) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (on, off))
    for key in ACCURACY_FIELDS:
        assert a.get(key) == b.get(key), key
    strip = [{k: v for k, v in c.items() if k != "train_seconds"} for c in a["cost"]]
    assert strip == [{k: v for k, v in c.items() if k != "train_seconds"} for c in b["cost"]]
    assert a["budget"] == b["budget"] and a["ece"] == b["ece"]
    assert b["openset"] is None and a["openset"] is not None
    wa, wb = (load_checkpoint(d / "checkpoints" / "task_2.pt")["state"]["net"] for d in (on, off))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_evaluation_runs_in_eval_mode_and_changes_nothing():
    """The open-set pass is an eval-mode forward of every module, and leaves the weights, the
    BatchNorm statistics and every random generator as they were."""
    from dynammo.run.evaluation import evaluate
    from method_helpers import make_method, run_task

    m = make_method("finetune")
    task = m.scenario.tasks[0]
    run_task(m, task)
    m.train_mode()  # evaluate must switch to eval mode itself
    calls = []

    def hook(module, args):
        calls.append(module.training)

    handles = [mod.register_forward_pre_hook(hook) for mod in m.net.modules()]
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    rng, gen = torch.get_rng_state(), m.engine.generator.get_state()
    metrics = ContinualMetrics([(t.start, t.end) for t in m.scenario.tasks])
    metrics.openset_score = "max_softmax"
    evaluate(m.cfg, m, m.engine, m.scenario, task, metrics)
    for h in handles:
        h.remove()
    assert calls and not any(calls)
    # the seen (task 1) and the unseen (tasks 2-3) passes both ran
    n_seen = len(m.scenario.test_data_seen(task))
    assert metrics.openset[0]["n_known"] == n_seen
    assert metrics.openset[0]["n_unknown"] == len(m.scenario.test) - n_seen
    assert all(torch.equal(before[k], v) for k, v in m.net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(m.engine.generator.get_state(), gen)


def test_the_open_set_module_needs_no_sklearn():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(openset))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name and name.startswith("sklearn") for name in names)
