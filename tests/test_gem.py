"""GEM: the gradient projection (quadratic program), the before_step hook, the per-task memory,
reloading, and an end-to-end run of the `dynammo` command."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from dynammo.batch import Batch
from dynammo.configure import build_config
from dynammo.errors import UserError
from dynammo.methods.gem import flat_grad, project_to_cone, write_grad

import method_helpers
from method_helpers import DIGITS_8PX, QUIET, cli_args, run_task

pytestmark = pytest.mark.usefixtures("single_thread")


def make_method(**kw):
    return method_helpers.make_method("gem", method_helpers.TINY, **{"opt_mom": 0.0, "weight_decay": 0.0, **kw})


# ---------------------------------------------------------------- the quadratic program


def test_projection_matches_hand_solved_2d_cases():
    g, old = torch.tensor([1.0, -0.2], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    # margin 0: the Euclidean projection onto <x, (0, 1)> >= 0 is (1, 0) (dual v = 0.2)
    assert torch.allclose(project_to_cone(g, old, margin=0.0), torch.tensor([1.0, 0.0], dtype=torch.float64),
                          atol=1e-8)
    # margin 0.5: v = max(0.2, 0.5) = 0.5, so g~ = g + 0.5 * (0, 1) = (1, 0.3)
    assert torch.allclose(project_to_cone(g, old, margin=0.5), torch.tensor([1.0, 0.3], dtype=torch.float64),
                          atol=1e-8)
    # two active constraints: (-1, -1) against both axes projects to the origin (v = (1, 1))
    both = project_to_cone(torch.tensor([-1.0, -1.0], dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    assert torch.allclose(both, torch.zeros(2, dtype=torch.float64), atol=1e-8)


def test_projected_gradient_never_raises_an_old_task_loss():
    g_ = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(40):
        t = 1 + trial % 5
        old = torch.randn(t, 30, generator=g_, dtype=torch.float64)
        g = torch.randn(30, generator=g_, dtype=torch.float64)
        if not bool((old @ g < 0).any()):
            continue
        checked += 1
        for margin in (0.0, 0.5):
            proj = project_to_cone(g, old, margin)
            assert (old @ proj >= -1e-6).all(), (trial, margin, old @ proj)
        if t == 1:  # one constraint, margin 0: the closed form g - <g, a> / |a|^2 a
            a = old[0]
            assert torch.allclose(project_to_cone(g, old, 0.0), g - (g @ a) / (a @ a) * a, atol=1e-8)
    assert checked >= 20


def test_dependent_old_gradients_still_solve():
    a = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    old = torch.stack([a, 2 * a])  # G G^T is singular: the ridge makes the QP solvable
    proj = project_to_cone(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64), old, 0.0)
    assert (old @ proj >= -1e-6).all()


# ---------------------------------------------------------------- the before_step hook


def _method_in_task_1(**kw):
    m = make_method(**kw)
    run_task(m, m.scenario.tasks[0])
    task = m.scenario.tasks[1]
    m.begin_task(task)
    m.current = task
    m.old_memories = m.load_old_memories(task)
    m.train_mode()
    return m, [p for p in m.net.parameters() if p.requires_grad]


def test_hook_keeps_a_harmless_gradient_and_projects_a_harmful_one(monkeypatch):
    m, params = _method_in_task_1(gem_memory_forward="separate")
    n = sum(p.numel() for p in params)
    g_old = torch.zeros(n)
    g_old[:5] = 1.0
    monkeypatch.setattr(m, "memory_gradient", lambda *a: g_old.clone())
    for p in params:  # <g, g_old> = 5 > 0: nothing to project
        p.grad = torch.ones_like(p)
    m.project(params)
    assert torch.equal(flat_grad(params), torch.ones(n))
    for p in params:  # <g, g_old> = -5 < 0: projected, then no longer harmful
        p.grad = -torch.ones_like(p)
    m.project(params)
    after = flat_grad(params)
    assert not torch.equal(after, -torch.ones(n))
    assert float(after @ g_old) >= -1e-6
    assert torch.equal(after[5:], -torch.ones(n - 5))  # only the constrained directions change


def test_weight_decay_is_projected_with_the_gradient_not_added_by_the_optimiser(monkeypatch):
    m, params = _method_in_task_1(gem_memory_forward="separate", weight_decay=0.01)
    seen = {}
    monkeypatch.setattr(m.engine, "fit", lambda params, data, loss, settings, **kw: seen.update(s=settings, **kw))
    m.train_task(m.current)
    assert seen["s"].weight_decay == 0.0 and m.weight_decay == 0.01  # the optimiser adds nothing after the hook
    m.old_memories = m.load_old_memories(m.current)
    n = sum(p.numel() for p in params)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    g_old = torch.zeros(n)
    g_old[:5] = 1.0
    monkeypatch.setattr(m, "memory_gradient", lambda *a: g_old.clone())
    for p in params:
        p.grad = torch.full_like(p, 10.0)  # harmless with or without the decay term
    m.project(params)
    assert torch.allclose(flat_grad(params), 10.0 + 0.01 * theta)
    for p in params:  # harmful: g + wd·θ is what gets projected
        p.grad = torch.full_like(p, -10.0)
    m.project(params)
    after = flat_grad(params)
    assert float(after @ g_old) >= -1e-5
    assert torch.allclose(after[5:], -10.0 + 0.01 * theta[5:])


def test_hook_on_real_gradients_of_the_network():
    m, params = _method_in_task_1(gem_memory_forward="separate", gem_loss_scope="seen")
    data = m.scenario.train_data(m.current)
    idx = torch.arange(16)
    raw = data.get(idx)
    batch = Batch(m.engine.train_tf(raw), data.labels[idx], raw, idx)
    loss, _, _ = m.step(batch)
    loss.backward()
    g = flat_grad(params)
    (raw_mem, y_mem, old_task), = m.old_memories
    g_old = m.memory_gradient(params, raw_mem, y_mem, old_task)
    assert float(g @ g_old) < 0  # learning the new classes would raise the old task's loss ...
    for p, v in zip(params, torch.split(g, [p.numel() for p in params])):
        p.grad = v.view_as(p).clone()
    m.project(params)
    proj = flat_grad(params)
    assert float(proj @ g_old) >= -1e-5 * float(g.norm() * g_old.norm())  # ... the projection does not
    assert not torch.equal(proj, g)


def _current_batch(m, n=16):
    data = m.scenario.train_data(m.current)
    idx = torch.arange(n)
    raw = data.get(idx)
    return Batch(m.engine.train_tf(raw), data.labels[idx], raw, idx)


def test_joint_step_takes_each_old_gradient_from_one_shared_forward_pass():
    m, params = _method_in_task_1(gem_memory_forward="joint", gem_loss_scope="seen")
    batch = _current_batch(m)
    (raw_mem, y_mem, old_task), = m.old_memories
    loss, logits, _ = m.joint_step(batch)
    # by hand: one pass over [current; memory]; old task's loss on its slice, current loss on the rest
    out = m.net(torch.cat([batch.x, m.engine.train_tf(raw_mem)]))
    mem_loss = torch.nn.functional.cross_entropy(out[len(batch.y):], y_mem)
    expected_old = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mem_loss, params, retain_graph=True)])
    assert torch.allclose(m.old_gradients[0], expected_old, rtol=1e-4, atol=1e-6)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(out[: len(batch.y)], batch.y), rtol=1e-5)
    assert torch.allclose(logits, out[: len(batch.y)], rtol=1e-4, atol=1e-5)
    # not the gradient of a pass over the memory alone: BatchNorm statistics differ
    alone = m.memory_gradient(params, raw_mem, y_mem, old_task)
    assert not torch.allclose(alone, expected_old, rtol=1e-3, atol=1e-5)


def test_joint_mode_projects_against_the_shared_pass_gradients():
    m, params = _method_in_task_1(gem_memory_forward="joint", gem_loss_scope="seen")
    loss, _, _ = m.step(_current_batch(m))
    loss.backward()
    g = flat_grad(params)
    g_old = m.old_gradients[0]
    if float(g @ g_old) >= 0:  # make the step harmful for the old task: reflect g along g_old
        g = g - (2 * (g @ g_old) / (g_old @ g_old) + 0.1) * g_old
        write_grad(params, g)
    assert float(g @ g_old) < 0
    m.project(params)
    proj = flat_grad(params)
    assert float(proj @ g_old) >= -1e-5 * float(g.norm() * g_old.norm())
    assert not torch.equal(proj, g)


@pytest.mark.parametrize("mode,passes", [("joint", 1), ("separate", 2)])
def test_forward_passes_per_step(mode, passes):
    """joint: BatchNorm sees one mixed batch per step; separate: one batch per task."""
    m, params = _method_in_task_1(gem_memory_forward=mode)
    bn = next(x for x in m.net.modules() if isinstance(x, torch.nn.BatchNorm2d))
    before = int(bn.num_batches_tracked)
    loss, _, _ = m.step(_current_batch(m))
    loss.backward()
    m.project(params)
    assert int(bn.num_batches_tracked) - before == passes


# ---------------------------------------------------------------- memory, options, reload


def test_memory_is_split_over_the_tasks_seen():
    m = make_method()
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    first = {c: m.memory.per_class[c].images.clone() for c in t0.classes}
    assert {c: len(m.memory.per_class[c]) for c in t0.classes} == {c: 30 // 4 for c in t0.classes}
    run_task(m, t1)
    # 30 // 2 = 15 per task: 15 // 4 = 3 per class of task 0, 15 // 3 = 5 per class of task 1
    assert {c: len(s) for c, s in m.memory.per_class.items()} == {**{c: 3 for c in t0.classes},
                                                                  **{c: 5 for c in t1.classes}}
    for c in t0.classes:  # older tasks are truncated in selection order
        assert torch.equal(m.memory.per_class[c].images, first[c][:3])
    assert [m.memory_budget(n) for n in (4, 7, 10)] == [28, 27, 26]  # what `dynammo cost` reports


def test_config_checks(monkeypatch):
    with pytest.raises(UserError, match="memory_size=10 split over 3 tasks"):
        make_method(memory_size=10)
    make_method(memory_size=10, memory_per_class=2)
    with pytest.raises(UserError, match="gem_loss_scope"):
        make_method(gem_loss_scope="all")
    with pytest.raises(UserError, match="gem_memory_forward"):
        make_method(gem_memory_forward="both")
    monkeypatch.setitem(sys.modules, "quadprog", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install quadprog"):
        make_method()


def test_task_scope_restricts_losses_to_the_task_classes():
    m = make_method(gem_loss_scope="task")
    m.grow(m.scenario.tasks[0])
    task = m.scenario.tasks[1]
    m.begin_task(task)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([4, 5, 6, 4])
    loss, logits = m.loss_on(x, y, task)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:7], y - 4)
    assert torch.allclose(loss, expected)


def test_reload_gives_identical_predictions():
    m = make_method()
    for task in m.scenario.tasks[:2]:
        run_task(m, task)
    fresh = make_method(seed=5)
    fresh.load_state_dict(m.state_dict())
    m.eval_mode()
    fresh.eval_mode()
    x = m.engine.test_tf(m.scenario.test.get(torch.arange(20)))
    assert torch.equal(m.predict(x)["logits"], fresh.predict(x)["logits"])
    assert {c: s.images.tolist() for c, s in fresh.memory.per_class.items()} == \
        {c: s.images.tolist() for c, s in m.memory.per_class.items()}


# ---------------------------------------------------------------- end to end


def test_end_to_end_cli(cli, tmp_path):
    out = tmp_path / "gem"
    proc = cli("run", "--out", out, *cli_args({"method": "gem_il"}, DIGITS_8PX, init_cls=4, increment=3, epochs=1,
                                              max_train_per_class=12, memory_size=30, batch_size=16, gem_mem_batch=8,
                                              **QUIET))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["method"] == "gem"
    assert len(r["acc"]) == 3 and r["avg_acc"] is not None and r["forgetting"] is not None
    assert [c["memory_exemplars"] for c in r["cost"]] == [28, 27, 26]  # 30 split over 1, 2, 3 tasks
    assert all(c["memory_bytes"] > 0 and c["params_trainable"] == c["params_total"] for c in r["cost"])
    state = torch.load(out / "checkpoints" / "task_2.pt", map_location="cpu", weights_only=False)
    cfg = build_config({k: v for k, v in state["config"].items()})
    # the paper's procedure by default; the subsampled memory batch is a recorded deviation
    assert cfg.gem_margin == 0.5 and cfg.gem_loss_scope == "task" and cfg.gem_mem_batch == 8
    assert cfg.gem_memory_forward == "separate"
    assert r["label"] == "gem [gem_mem_batch=8]"
    assert any(d.startswith("gem_mem_batch=8 instead of the paper's unset") for d in r["deviations"])


def test_the_joint_batchnorm_variant_is_labelled_and_recorded():
    cfg = build_config({"method": "gem", "dataset": "digits", "memory_size": 30, "opt_mom": 0,
                        "gem_memory_forward": "joint"})
    from dynammo.methods import METHODS

    assert METHODS.get("gem").label(cfg) == "gem [gem_memory_forward=joint]"
    assert any("gem_memory_forward=joint instead of the paper's separate" in d
               for d in METHODS.get("gem").deviations(cfg))


@pytest.mark.parametrize("bad", [["opt_mom=0.9"], ["opt_type=adam", "opt_mom=0"]])
def test_gem_refuses_an_optimiser_that_is_not_plain_sgd(tmp_path, capsys, bad):
    from dynammo.cli import main

    rc = main(["run", "--out", str(tmp_path / "r"), "method=gem", "dataset=digits", "memory_size=30", *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "r").exists()
    assert len(err) == 1 and "needs plain SGD (opt_type=sgd, opt_mom=0)" in err[0]
