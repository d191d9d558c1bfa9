"""What makes each method itself, checked on what its training stages actually receive: every
`engine.fit` call of a task is recorded (its stage, data, loss, parameters) and compared with a set
built by hand from the papers' rules (shared/METHODS.md).

- ACL / DynaMMo: stage 1 trains on the task's data + the WHOLE memory, old classes labelled
  "others"; stage 3's class-balanced set holds m = M // n_old images per class: the first m
  exemplars (memory order) of every old class and m herding-chosen images of every new class.
- DER: the classifier stage retrains a re-initialised classifier alone, in eval mode, with
  CE(logits / T), on a balanced set of memory.quota(n_seen) images per class.
- BiC: stage 1 trains on the training part of the held-out split only; the validation part goes
  to the bias layer alone.
- GEM: the parameter update actually taken (after the optimiser step) does not raise any old
  task's memory loss to first order: <theta_after - theta_before, g_k> <= 0 for every old task k.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.data.imageset import ImageSet
from dynammo.data.memory import herding
from dynammo.methods.base import modules_in_training_mode

import method_helpers
from method_helpers import TINY, run_task

pytestmark = pytest.mark.usefixtures("single_thread")


def record_fits(m, at_start=None, at_end=None):
    """Record every engine.fit call of method m: {"stage", "data", "loss", "params", "settings"};
    at_start(call) / at_end(call) run just before / after the real fit."""
    calls = []
    real_fit = m.engine.fit

    def fit(params, data, loss_fn, settings, stage="train", **kw):
        params = list(params)
        call = {"stage": stage, "data": data, "loss": loss_fn, "params": params, "settings": settings}
        calls.append(call)
        if at_start:
            at_start(call)
        out = real_fit(params, data, loss_fn, settings, stage=stage, **kw)
        if at_end:
            at_end(call)
        return out

    m.engine.fit = fit
    return calls


def stage(calls, name):
    found = [c for c in calls if c["stage"] == name]
    assert len(found) == 1, f"expected one '{name}' stage, got {[c['stage'] for c in calls]}"
    return found[0]


def items(data: ImageSet) -> Counter:
    """The multiset of (label, image) of a set: what a stage trains on, whatever its order."""
    images = data.get(torch.arange(len(data)))
    return Counter((int(y), img.numpy().tobytes()) for y, img in zip(data.labels, images))


def of_class(data: ImageSet, c: int) -> ImageSet:
    return data.of_classes([c])


def as_batch(m, data: ImageSet) -> Batch:
    idx = torch.arange(len(data))
    raw = data.get(idx)
    return Batch(m.engine.test_tf(raw), data.labels.clone(), raw, idx)


def herded(m, data: ImageSet, n: int, features) -> Counter:
    """The n images herding picks from one class's data, on features(x) in eval mode."""
    return items(data.subset(herding(m.engine.apply(features, data), n)))


# ---------------------------------------------------------------- ACL / DynaMMo


@pytest.mark.parametrize("name", ["acl", "dynammo"])
def test_acl_stage1_data_and_stage3_balanced_set(name):
    m = method_helpers.make_method(name, epochs_finetune=1, backbone_epochs=1)
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    # hold MORE exemplars per old class than stage 3's m (10 > 30 // 4 = 7), in a scrambled memory
    # order, so "the first m in memory order" differs from "any m" and from "all of them"
    train0 = m.scenario.train_data(t0)
    gen = torch.Generator().manual_seed(1)
    for c in t0.classes:
        cls_data = of_class(train0, c)
        m.memory.per_class[c] = cls_data.subset(torch.randperm(len(cls_data), generator=gen)[:10])
    memory_before = {c: s for c, s in m.memory.per_class.items()}
    n_old, budget = t1.start, m.cfg.memory_size
    m_per_class = budget // n_old
    assert m_per_class == 7 and all(len(s) == 10 for s in memory_before.values())

    expected_new = {}

    def at_start(call):
        if call["stage"] == "heads":  # herding on the task adapters' features, adapters trained and frozen
            adapters = m.net.task_adapters()
            new = m.scenario.train_data(t1)
            for c in t1.classes:
                expected_new[c] = herded(m, of_class(new, c), m_per_class, lambda x: m.net.encode(x, adapters))

    calls = record_fits(m, at_start=at_start)
    m.begin_task(t1)
    m.train_task(t1)

    # stage 1: the task's data + the whole memory (all 10 exemplars of every old class)
    s1 = stage(calls, "adapters")
    whole_memory = ImageSet.concat([memory_before[c] for c in sorted(memory_before)])
    assert items(s1["data"]) == items(m.scenario.train_data(t1)) + items(whole_memory)
    # ... with every old class labelled "others" (= t1.size) and the new ones by their local label
    data = s1["data"]
    _, _, target = s1["loss"](as_batch(m, data))
    old = data.labels < t1.start
    assert torch.equal(target[old], torch.full((int(old.sum()),), t1.size))
    assert torch.equal(target[~old], data.labels[~old] - t1.start)
    assert int(old.sum()) == len(whole_memory)

    # stage 3: m = M // n_old per class; old classes: the first m in memory order; new: herding
    s3 = stage(calls, "heads")
    balanced = s3["data"]
    for c in t0.classes:
        assert items(of_class(balanced, c)) == items(memory_before[c].subset(torch.arange(m_per_class))), c
    for c in t1.classes:
        assert items(of_class(balanced, c)) == expected_new[c], c
    assert len(balanced) == m_per_class * t1.end


# ---------------------------------------------------------------- DER


@pytest.mark.parametrize("reset", [True, False])
def test_der_classifier_stage(reset):
    m = method_helpers.make_method("der", epochs_finetune=1, classifier_reset=reset)
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    memory_before = {c: s for c, s in m.memory.per_class.items()}
    quota = m.memory.quota(t1.end)  # the updated memory's quota, M // n_seen = 30 // 7
    assert quota == 4 and all(len(s) == 30 // 4 for s in memory_before.values())
    seen = {}

    def at_start(call):
        if call["stage"] == "classifier":
            seen["fc_at_start"] = {k: v.clone() for k, v in m.net.fc.state_dict().items()}
            seen["training"] = modules_in_training_mode(m)
            new = m.scenario.train_data(t1)
            seen["herded"] = {c: herded(m, of_class(new, c), quota, m.net.features) for c in t1.classes}

    def at_end(call):
        if call["stage"] == "representation":
            seen["fc_after_stage1"] = {k: v.clone() for k, v in m.net.fc.state_dict().items()}

    calls = record_fits(m, at_start, at_end)
    m.begin_task(t1)
    m.train_task(t1)
    cls_stage = stage(calls, "classifier")

    # the classifier alone trains, with the whole model (every extractor) in eval mode
    assert {id(p) for p in cls_stage["params"]} == {id(p) for p in m.net.fc.parameters()}
    assert seen["training"] == []
    # re-initialised before the stage (every weight changed), or kept with classifier_reset=false
    before, after = seen["fc_after_stage1"], seen["fc_at_start"]
    if reset:
        assert all(bool((before[k] != after[k]).all()) for k in before)
        bound = 1 / m.net.fc.in_features ** 0.5  # nn.Linear's default initialisation range
        assert float(after["weight"].abs().max()) <= bound
    else:
        assert all(torch.equal(before[k], after[k]) for k in before)
    # the balanced set: the first `quota` exemplars of every old class, `quota` herded per new class
    balanced = cls_stage["data"]
    for c in t0.classes:
        assert items(of_class(balanced, c)) == items(memory_before[c].subset(torch.arange(quota))), c
    for c in t1.classes:
        assert items(of_class(balanced, c)) == seen["herded"][c], c
    assert len(balanced) == quota * t1.end
    # the loss: CE(logits / T), logits of the whole concatenated representation
    batch = as_batch(m, balanced)
    m.eval_mode()
    with torch.no_grad():
        loss, logits, target = cls_stage["loss"](batch)
        want_logits = m.net.fc(m.net.features(batch.x))
    assert m.cfg.T == 5.0
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, F.cross_entropy(want_logits / 5.0, batch.y))
    assert abs(float(loss) - float(F.cross_entropy(want_logits, batch.y))) > 1e-4


# ---------------------------------------------------------------- BiC


def test_bic_stage1_trains_only_on_the_training_part_of_the_split():
    m = method_helpers.make_method("bic", epochs_bias=1)
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    everything = items(m.memory.as_imageset()) + items(m.scenario.train_data(t1))
    assert max(everything.values()) == 1  # no duplicate image, so the partition below is exact
    calls = record_fits(m)
    m.begin_task(t1)
    m.train_task(t1)
    train, val = items(stage(calls, "stage1")["data"]), items(stage(calls, "bias")["data"])
    assert not (train & val), "a held-out validation image is in stage 1's training data"
    assert train + val == everything  # the split covers the memory and the task's data, nothing else
    n_val = max(1, int(m.cfg.split_ratio * m.memory.quota(t1.start)))
    assert Counter(y for y, _ in val) == {c: n_val for c in range(t1.end)}
    # stage 2 trains the new bias layer alone
    assert {id(p) for p in stage(calls, "bias")["params"]} == {id(p) for p in m.net.bias_layers[-1].parameters()}


# ---------------------------------------------------------------- GEM


def gem_updates(m, tasks):
    """Train `tasks` (after task 0) recording every step: (theta before, the old tasks' gradients
    g_k GEM constrains, theta after the optimiser step), as float64 vectors."""
    steps = []
    real_fit = m.engine.fit

    def vector(params):
        return torch.cat([p.detach().reshape(-1).double() for p in params])

    def fit(params, data, loss_fn, settings, before_step=None, after_step=None, **kw):
        params = [p for p in params if p.requires_grad]
        grads = []
        real_memory_gradient = m.memory_gradient

        def memory_gradient(*a, **k):  # separate forward: g_k of each old task's own pass
            g = real_memory_gradient(*a, **k)
            grads.append(g.detach().double().clone())
            return g

        m.memory_gradient = memory_gradient

        def before():
            grads.clear()
            theta = vector(params)
            before_step()
            old = torch.stack(grads) if grads else m.old_gradients.detach().double().clone()  # joint forward
            steps.append([theta, old, None])

        def after():
            if after_step is not None:
                after_step()
            steps[-1][2] = vector(params)

        try:
            return real_fit(params, data, loss_fn, settings, before_step=before, after_step=after, **kw)
        finally:
            del m.memory_gradient

    m.engine.fit = fit
    for task in tasks:
        run_task(m, task)
    m.engine.fit = real_fit
    return steps


def worst_first_order_rise(steps) -> float:
    """max over steps and old tasks of <d theta, g_k> / (|d theta| |g_k|): > 0 means the step
    raised that task's memory loss to first order."""
    worst = -1.0
    for before, old, after in steps:
        d = after - before
        for g in old:
            worst = max(worst, float(d @ g) / float(d.norm() * g.norm() + 1e-30))
    return worst


@pytest.mark.parametrize("forward,weight_decay", [("separate", 0.0), ("separate", 5e-4), ("joint", 0.0)])
def test_gem_update_never_raises_an_old_task_memory_loss(forward, weight_decay):
    m = method_helpers.make_method("gem", opt_mom=0.0, weight_decay=weight_decay, gem_memory_forward=forward,
                                   epochs=2)
    run_task(m, m.scenario.tasks[0])
    steps = gem_updates(m, m.scenario.tasks[1:])
    assert len(steps) >= 8 and {len(old) for _, old, _ in steps} == {1, 2}  # task 2 has two old tasks
    assert worst_first_order_rise(steps) <= 1e-6


def test_the_gem_update_check_catches_a_momentum_step():
    """Built past GEM's config check (which refuses momentum): the momentum step is not the projected
    gradient, and the check above sees an old task's loss rise."""
    cfg_kw = dict(TINY, opt_mom=0.9, weight_decay=0.0, epochs=2)
    m = method_helpers.make_method("gem", cfg_kw, check=False)
    run_task(m, m.scenario.tasks[0])
    assert worst_first_order_rise(gem_updates(m, m.scenario.tasks[1:])) > 1e-3
