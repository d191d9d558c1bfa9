"""RanPAC: the ridge head is the closed-form solution; statistics accumulated task by task equal
the ones of all the data at once; the chosen lambda is the best of the grid on the held-out part;
the projection is frozen and one backbone pass runs at inference; the statistics' memory is in
`cost`, and a projection that will not fit is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dynammo.cli import main
from dynammo.cost import count_flops
from dynammo.methods import ranpac as ranpac_module
from dynammo.methods.ranpac import choose_lambda, ridge_solution, statistics_bytes, validation_scores
from dynammo.models.backbones import build_backbone

import method_helpers
from method_helpers import make_method, run_task, same, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")
M = 48


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(123)
    path = tmp_path / "resnet20.pt"
    torch.save(build_backbone("resnet20").state_dict(), path)
    return path


def trained(path, n_tasks=3, **kw):
    m = make_method("ranpac", pretrained=str(path), **{"ranpac_m": M, **kw})
    for task in m.scenario.tasks[:n_tasks]:
        run_task(m, task)
    m.eval_mode()
    return m


def test_ridge_solution_is_the_closed_form_minimiser():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(30, 6, generator=g, dtype=torch.float64)
    y = F.one_hot(torch.arange(30) % 3, 3).double()
    lam = 0.7
    w = ridge_solution(h.T @ h, h.T @ y, lam)
    assert torch.allclose(w, torch.linalg.inv(h.T @ h + lam * torch.eye(6, dtype=torch.float64)) @ h.T @ y)
    # the gradient of ||H W - Y||^2 + lam ||W||^2 vanishes there
    assert torch.allclose(h.T @ (h @ w - y) + lam * w, torch.zeros_like(w), atol=1e-10)


def all_training_statistics(m):
    """G and Q of every task's training images at once, through the final (frozen) model."""
    data = m.scenario.train.of_classes(range(m.total))
    with torch.no_grad():
        h = m.net.project(m.net.encode(m.engine.test_tf(data.images)).double())
    return h.T @ h, h.T @ F.one_hot(data.labels, m.total).double(), h


def test_accumulating_over_tasks_equals_one_computation_on_all_data(weights_file):
    m = trained(weights_file)
    gram, sums, h = all_training_statistics(m)
    assert m.gram.dtype == m.class_sums.dtype == torch.float64
    assert m.gram.shape == (M, M) and m.class_sums.shape == (M, 10)
    assert torch.allclose(m.gram, gram, rtol=1e-9, atol=1e-9)
    assert torch.allclose(m.class_sums, sums, rtol=1e-9, atol=1e-9)
    assert (h >= 0).all()  # ReLU after the projection
    w = ridge_solution(gram, sums, m.lambdas[-1])
    assert m.net.head.dtype == torch.float64 and torch.allclose(m.net.head, w.T, rtol=1e-6, atol=1e-9)
    x = m.engine.test_tf(m.scenario.test.images[:4])
    with torch.no_grad():
        f = m.net.encode(x)
        expected = F.relu(f.double() @ m.net.projection) @ m.net.head.T
        assert torch.allclose(m.predict(x)["logits"], expected)


def test_the_projection_is_drawn_once_and_frozen(weights_file):
    m = make_method("ranpac", pretrained=str(weights_file), ranpac_m=M)
    run_task(m, m.scenario.tasks[0])
    drawn = m.net.projection.detach().clone()
    assert drawn.shape == (m.net.backbone.out_dim, M) and drawn.std() > 0.5  # N(0, 1) entries
    after_task_1 = snapshot(m.net)
    for task in m.scenario.tasks[1:]:
        m.engine.begin_task(f"task {task.id + 1}/3")
        run_task(m, task)
        assert m.engine.end_task().stages == []  # phase 1 is the first task's only
    assert torch.equal(m.net.projection, drawn)
    kept = {k: v for k, v in after_task_1.items() if k != "head"}
    assert same({k: v for k, v in snapshot(m.net).items() if k != "head"}, kept)


def brute_force_scores(h_fit, y_fit, h_val, y_val, lambdas, n):
    mse, acc = [], []
    for lam in lambdas:
        w = ridge_solution(h_fit.T @ h_fit, h_fit.T @ F.one_hot(y_fit, n).double(), lam)
        pred = h_val @ w
        mse.append(float(((pred - F.one_hot(y_val, n).double()) ** 2).mean()))
        acc.append(100.0 * float((pred.argmax(1) == y_val).double().mean()))
    return mse, acc


@pytest.mark.parametrize("width", [10, 80])  # more images than features, and fewer (G is singular)
def test_validation_scores_equal_one_solve_per_lambda(width):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, width, generator=g, dtype=torch.float64) * 2
    y = torch.arange(60) % 3
    h = centres[y] + torch.randn(60, width, generator=g, dtype=torch.float64)
    lambdas = [1e-6, 1e-2, 1.0, 1e2, 1e6]
    scores = validation_scores(h[:48], y[:48], h[48:], y[48:], lambdas, 3)
    mse, acc = brute_force_scores(h[:48], y[:48], h[48:], y[48:], lambdas, 3)
    assert scores["mse"] == pytest.approx(mse, rel=1e-6)  # G + 1e-6 I of rank-48 G: the solve loses digits
    assert scores["accuracy"] == pytest.approx(acc)


def test_choose_lambda_is_the_argmin_of_mse_or_the_first_argmax_of_accuracy():
    lambdas = [1e-2, 1.0, 1e2, 1e4]
    scores = {"mse": [0.5, 0.2, 0.3, 0.9], "accuracy": [70.0, 90.0, 90.0, 40.0]}
    assert choose_lambda(scores, lambdas, "mse") == 1.0
    assert choose_lambda(scores, lambdas, "accuracy") == 1.0  # the first of the tie
    scores["accuracy"] = [70.0, 80.0, 95.0, 40.0]
    assert choose_lambda(scores, lambdas, "accuracy") == 1e2


@pytest.mark.parametrize("criterion", ["mse", "accuracy"])
def test_the_method_picks_the_best_lambda_of_its_held_out_split(weights_file, criterion):
    m = trained(weights_file, n_tasks=1, ranpac_ridge_criterion=criterion)
    data = m.scenario.train_data(m.scenario.tasks[0])
    with torch.no_grad():
        h = m.net.project(m.net.encode(m.engine.test_tf(data.images)).double())
    state = m.engine.generator.get_state()
    chosen = m.select_lambda(h, data.labels, 4)
    m.engine.generator.set_state(state)
    order = torch.randperm(len(data), generator=m.engine.generator)  # the split it drew
    n_fit = int(len(data) * 0.8)
    fit, val = order[:n_fit], order[n_fit:]
    lambdas = list(m.cfg.ranpac_lambdas)
    mse, acc = brute_force_scores(h[fit].double(), data.labels[fit], h[val].double(), data.labels[val], lambdas, 4)
    if criterion == "mse":
        assert chosen == lambdas[min(range(len(mse)), key=mse.__getitem__)]
    else:
        assert chosen == lambdas[acc.index(max(acc))]
    assert len(val) == len(data) - int(len(data) * 0.8)


def test_one_backbone_pass_then_two_products(weights_file):
    m = make_method("ranpac", pretrained=str(weights_file), ranpac_m=M)
    for task in m.scenario.tasks:
        m.grow(task)
    m.eval_mode()
    x = m.engine.test_tf(m.scenario.test.images[:1])
    d = m.net.backbone.out_dim
    assert count_flops(m.predict, x) == count_flops(m.net.tuned, x) + 2 * d * M + 2 * M * 10


def test_no_adaptation_and_no_projection(weights_file):
    m = trained(weights_file, ranpac_adapt="none", ranpac_m=0)
    assert m.net.tuned is None and m.net.projection is None
    gram, sums, _ = all_training_statistics(m)
    d = m.net.backbone.out_dim
    assert m.gram.shape == (d, d) and torch.allclose(m.gram, gram, rtol=1e-9, atol=1e-9)
    assert m.extra_cost() == {"statistics_bytes": 8 * (d * d + d * 10)}


def test_the_statistics_memory_is_in_the_cost_rows(tiny_run, capsys):
    run_dir = tiny_run("ranpac")
    recorded = json.loads((run_dir / "results.json").read_text())["cost"]
    m = method_helpers.METHOD_TINY["ranpac"]["ranpac_m"]
    assert [r["statistics_bytes"] for r in recorded] == [statistics_bytes(m, c) for c in (4, 7, 10)]
    capsys.readouterr()
    assert main(["cost", "-c", str(run_dir / "config.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["statistics_bytes"] for r in rows] == [r["statistics_bytes"] for r in recorded]


def test_a_projection_that_does_not_fit_in_memory_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = method_helpers.tiny_run_args("ranpac", ranpac_m=10000)
    monkeypatch.setattr(ranpac_module, "available_memory_bytes", lambda: 2 * 2**30)  # 2 GiB free
    assert main(["run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ranpac_m=10000" in err[0] and "lower ranpac_m" in err[0]
    assert not out.exists()
    monkeypatch.undo()
    # on any machine: a projection of 10^7 would need petabytes
    assert main(["run", "--out", str(out), *method_helpers.tiny_run_args("ranpac", ranpac_m=10**7)]) == 2
    assert "ranpac_m=10000000" in capsys.readouterr().err and not out.exists()
