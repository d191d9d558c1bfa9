"""SimpleCIL: the classifier weights are the class means of the frozen features, computed here by
hand; the logits are cosines; nothing trains when weights are given; one backbone pass."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynammo.cost import count_flops
from dynammo.models.backbones import build_backbone

from method_helpers import make_method, run_task, same, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def weights_file(tmp_path):
    """A stand-in for pretrained weights: a seeded random resnet20 saved to disk."""
    torch.manual_seed(123)
    weights = build_backbone("resnet20").state_dict()
    path = tmp_path / "resnet20.pt"
    torch.save(weights, path)
    return path, weights


def hand_features(method, data) -> torch.Tensor:
    """The frozen backbone's features of `data` with the test transform, one image at a time."""
    with torch.no_grad():
        return torch.cat([method.net.backbone.eval()(method.engine.test_tf(data.images[i: i + 1]))
                          for i in range(len(data))])


def test_weights_are_the_class_means_and_old_ones_never_change(weights_file):
    path, weights = weights_file
    m = make_method("simplecil", pretrained=str(path))
    before = None
    for task in m.scenario.tasks:
        m.engine.begin_task(f"task {task.id + 1}/3")
        run_task(m, task)
        assert m.engine.end_task().train_images == 0  # nothing trained: no fit stage at all
        data = m.scenario.train_data(task)
        feats = hand_features(m, data)
        for c in task.classes:
            mean = feats[data.labels == c].mean(0)
            assert torch.allclose(m.net.prototypes[c], mean.double(), atol=1e-5), c
        if before is not None:  # the earlier classes' weights are untouched, bit for bit
            assert torch.equal(m.net.prototypes[: len(before)], before)
        before = m.net.prototypes.detach().clone()
    assert m.net.prototypes.shape == (10, m.net.backbone.out_dim)
    assert same(snapshot(m.net.backbone), weights)  # the backbone is the file's, untouched
    assert not any(p.requires_grad for p in m.net.parameters())


def test_logits_are_cosines_to_the_prototypes(weights_file):
    m = make_method("simplecil", pretrained=str(weights_file[0]))
    for task in m.scenario.tasks[:2]:
        run_task(m, task)
    m.eval_mode()
    x = m.engine.test_tf(m.scenario.test_data_seen(m.scenario.tasks[1]).images[:5])
    with torch.no_grad():
        f = m.net.backbone(x)
        expected = F.normalize(f.double(), dim=1) @ F.normalize(m.net.prototypes, dim=1).T
        logits = m.predict(x)["logits"]
    assert logits.shape == (5, 7)
    assert logits.dtype == torch.float64 and torch.allclose(logits, expected, atol=1e-12)
    assert logits.abs().max() <= 1 + 1e-6


def test_without_weights_the_backbone_trains_on_task_1_only():
    m = make_method("simplecil")
    t0, t1 = m.scenario.tasks[:2]
    m.engine.begin_task("task 1/3")
    run_task(m, t0)
    assert [s["stage"] for s in m.engine.end_task().stages] == ["backbone"]
    after_task_1 = snapshot(m.net.backbone)
    m.engine.begin_task("task 2/3")
    run_task(m, t1)
    assert m.engine.end_task().stages == []
    assert same(snapshot(m.net.backbone), after_task_1)
    assert any("no pretrained weights" in d for d in type(m).deviations(m.cfg))


def test_inference_is_one_backbone_pass_plus_the_cosine_layer(weights_file):
    m = make_method("simplecil", pretrained=str(weights_file[0]))
    for task in m.scenario.tasks:
        m.grow(task)
    m.eval_mode()
    x = m.engine.test_tf(m.scenario.test.images[:1])
    d = m.net.backbone.out_dim
    assert count_flops(m.predict, x) == count_flops(m.net.backbone, x) + 2 * d * 10
