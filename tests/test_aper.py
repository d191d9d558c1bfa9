"""APER: the feature is the concatenation of the frozen pretrained and the adapted backbone's
features; the adaptation happens on task 1 only; the prototypes are class means of the
concatenation; two backbone passes at inference; an interruption inside the adaptation stage
resumes exactly."""
from __future__ import annotations

import json

import pytest
import torch

from dynammo.cli import main
from dynammo.cost import count_flops
from dynammo.engine import Engine
from dynammo.models.backbones import build_backbone

import method_helpers
from method_helpers import VIT_TINY, make_method, run_task, same, snapshot
from test_method_contract import same_outcome

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(123)
    weights = build_backbone("resnet20").state_dict()
    path = tmp_path / "resnet20.pt"
    torch.save(weights, path)
    return path, weights


def trained(variant: str, path, n_tasks: int = 3):
    m = make_method("aper", pretrained=str(path), aper_variant=variant)
    stages = []
    for task in m.scenario.tasks[:n_tasks]:
        m.engine.begin_task(f"task {task.id + 1}/3")
        run_task(m, task)
        stages.append([s["stage"] for s in m.engine.end_task().stages])
    m.eval_mode()
    return m, stages


@pytest.mark.parametrize("variant", ["adapter", "finetune"])
def test_feature_is_the_concatenation_and_prototypes_are_its_class_means(variant, weights_file):
    path, weights = weights_file
    m, stages = trained(variant, path)
    assert stages == [[f"adapt ({variant})"], [], []]  # task 1 adapts; later tasks train nothing
    net = m.net
    assert same(snapshot(net.backbone), weights)  # the pretrained backbone never changes
    assert not any(p.requires_grad for p in net.parameters())
    data = m.scenario.train_data(m.scenario.tasks[2])
    x = m.engine.test_tf(data.images)
    with torch.no_grad():
        pretrained, adapted = net.backbone(x), net.tuned(x)
        assert torch.equal(net.encode(x), torch.cat([pretrained, adapted], dim=1))
    assert not torch.allclose(pretrained, adapted)  # the adaptation changed the second half
    feats = torch.cat([pretrained, adapted], dim=1)
    for c in m.scenario.tasks[2].classes:
        assert torch.allclose(net.prototypes[c], feats[data.labels == c].mean(0).double(), atol=1e-5)


def test_adapter_variant_trains_the_adapters_alone_and_finetune_a_copy(weights_file):
    path, weights = weights_file
    m, _ = trained("adapter", path, n_tasks=1)
    assert m.net.tuned.backbone is m.net.backbone  # one set of backbone weights, the adapters beside it
    assert same(snapshot(m.net.tuned.backbone), weights)
    assert any(a.alpha.item() != pytest.approx(0.02) for a in m.net.tuned.adapters.adapters.values())
    f, _ = trained("finetune", path, n_tasks=1)
    assert f.net.tuned.backbone is not f.net.backbone and f.net.tuned.adapters is None
    assert not same(snapshot(f.net.tuned.backbone), weights)


def test_after_task_1_the_adapted_copy_stays_as_it_is(weights_file):
    m = make_method("aper", pretrained=str(weights_file[0]), aper_variant="finetune")
    run_task(m, m.scenario.tasks[0])
    after = snapshot(m.net.tuned)
    for task in m.scenario.tasks[1:]:
        run_task(m, task)
    assert same(snapshot(m.net.tuned), after)
    m.net.train()
    assert not m.net.tuned.training and not m.net.backbone.training


def test_inference_runs_the_backbone_twice(weights_file):
    m = make_method("aper", pretrained=str(weights_file[0]), aper_variant="finetune")
    for task in m.scenario.tasks:
        m.grow(task)
    m.eval_mode()
    x = m.engine.test_tf(m.scenario.test.images[:1])
    d = m.net.backbone.out_dim
    assert count_flops(m.predict, x) == 2 * count_flops(m.net.backbone, x) + 2 * (2 * d) * 10


def test_a_vit_takes_finetune_and_refuses_the_cnn_adapter(tmp_path, capsys):
    m = make_method("aper", **VIT_TINY, aper_variant="finetune")
    run_task(m, m.scenario.tasks[0])
    assert m.net.prototypes.shape == (4, 2 * m.net.backbone.out_dim)
    args = method_helpers.tiny_run_args("aper", **VIT_TINY)  # the default variant: adapter
    out = tmp_path / "refused"
    assert main(["run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aper_variant=adapter" in err[0] and "aper_variant=finetune" in err[0]
    assert not out.exists()


def test_an_interruption_inside_the_adaptation_resumes_exactly(run_in_process, tiny_run, tmp_path, monkeypatch):
    """Stopped after the first batch of task 1's second stage (the adaptation; the first trains the
    backbone, as the run has no weights): the resumed run restores the finished backbone stage from
    the journal, re-copies it, continues the adaptation and ends as the uninterrupted run."""
    reference = tiny_run("aper")
    assert [s["stage"] for s in json.loads((reference / "results.json").read_text())["budget"][0]] == \
        ["backbone", "adapt (adapter)"]
    out = tmp_path / "cut"
    real_fit = Engine.fit
    seen = []

    def stop_in_adaptation(self, *a, **k):
        seen.append(k.get("stage"))
        if k.get("stage", "").startswith("adapt"):
            self.stop_requested = "SIGINT"
        return real_fit(self, *a, **k)

    monkeypatch.setattr(Engine, "fit", stop_in_adaptation)
    assert run_in_process("run", "--out", str(out), *method_helpers.tiny_run_args("aper")) == 130
    monkeypatch.undo()
    assert seen == ["backbone", "adapt (adapter)"] and (out / "checkpoints" / "partial.pt").is_file()
    assert run_in_process("resume", str(out)) == 0
    same_outcome(reference, out)


def test_stage_maps_too_small_for_the_adapter_are_refused_before_the_run():
    from dynammo.errors import UserError

    with pytest.raises(UserError, match=r"img_size=16 leaves the input of layer3, layer4 smaller than 3x3"):
        make_method("aper", backbone="resnet18", img_size=16)
    make_method("aper", backbone="resnet18", img_size=16, aper_variant="finetune")  # no adapter: any size
