"""Vision Transformer backbones (timm): the CLS feature, local checkpoints in every format, pos_embed
resampling, the offline error of `pretrained: true`, the FLOP count, and methods on a ViT."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from dynammo.cost import count_flops
from dynammo.errors import UserError
from dynammo.models.backbones import BACKBONES, backbone_kwargs, build_backbone
from dynammo.models.backbones.vit import ViTBackbone, is_vit, split_name

pytestmark = pytest.mark.usefixtures("single_thread")

# the tiny ViT of the method runs: 16 px, 4 px patches (16 tokens + CLS), width 32, 2 blocks, 2 heads
SMALL = dict(img_size=16, vit_patch_size=4, vit_embed_dim=32, vit_depth=2, vit_heads=2)
VIT_RUN = dict(backbone="vit_cpu", **SMALL)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_vit(**kw) -> ViTBackbone:
    return build_backbone("vit_cpu", **{**SMALL, **kw}).eval()


def randomized(backbone: ViTBackbone) -> ViTBackbone:
    """Every parameter random (timm initialises the CLS token / pos_embed small and LN to 1/0)."""
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(0, 0.2)
    return backbone


def features(backbone, x):
    with torch.no_grad():
        return backbone(x)


# ---------------------------------------------------------------- names and structure


def test_registry_names_and_timm_tags():
    assert {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_cpu"} <= set(BACKBONES.names())
    assert split_name("vit_base_patch16_224.augreg2_in21k_ft_in1k") == ("vit_base_patch16_224", "augreg2_in21k_ft_in1k")
    assert split_name("ViT_Base_Patch16_224.orig_in21k") == ("vit_base_patch16_224", "orig_in21k")
    assert split_name("resnet18") == ("resnet18", None)
    assert is_vit("vit_cpu") and is_vit("vit_base_patch16_224.orig_in21k") and not is_vit("resnet18")
    with pytest.raises(UserError, match="no weights tagged 'nope'.*augreg_in21k_ft_in1k"):
        build_backbone("vit_tiny_patch16_224.nope", img_size=32)
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("resnet18.a1_in1k")


def test_vit_cpu_defaults_and_sizes():
    b = build_backbone("vit_cpu")
    assert isinstance(b.vit, VisionTransformer)
    assert (b.img_size, b.patch_size, b.out_dim, len(b.vit.blocks)) == (32, 8, 64, 5)
    assert b.vit.blocks[0].attn.num_heads == 4 and b.vit.blocks[0].mlp.fc1.out_features == 128
    assert b.vit.blocks[0].attn.qkv.bias is not None
    assert b.vit.num_classes == 0 and b.vit.global_pool == "token"
    assert b.stage_names == []
    s = small_vit()
    assert (s.img_size, s.patch_size, s.out_dim, len(s.vit.blocks)) == (16, 4, 32, 2)
    assert s.vit.patch_embed.num_patches == 16


def test_timm_architectures_are_built_for_the_run_image_size():
    b = build_backbone("vit_tiny_patch16_224", img_size=32).eval()
    assert b.out_dim == 192 and len(b.vit.blocks) == 12
    assert tuple(b.vit.pos_embed.shape) == (1, 5, 192)  # 2x2 patches + CLS
    assert features(b, torch.randn(2, 3, 32, 32)).shape == (2, 192)
    with pytest.raises(UserError, match="multiple of vit_tiny_patch16_224's patch size 16"):
        build_backbone("vit_tiny_patch16_224", img_size=40)


@pytest.mark.parametrize("kw, match", [
    (dict(vit_embed_dim=30, vit_heads=4), "vit_embed_dim=30 must be a multiple of vit_heads=4"),
    (dict(img_size=18, vit_patch_size=4), "img_size=18 must be a multiple of vit_patch_size=4"),
    (dict(img_size=4, vit_patch_size=8), "img_size=4 must be a multiple of vit_patch_size=8"),
])
def test_vit_cpu_size_errors_are_one_line(kw, match):
    with pytest.raises(UserError, match=match) as err:
        build_backbone("vit_cpu", **{**SMALL, **kw})
    assert "\n" not in str(err.value)


def test_feature_is_timm_cls_token_after_the_final_norm():
    b = randomized(small_vit())
    ref = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                            qkv_bias=True, num_classes=0, global_pool="token").eval()
    ref.load_state_dict(b.vit.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = ref.forward_features(x)[:, 0]
        assert torch.equal(want, ref(x))  # timm's own pooled output: the CLS token, no head
    torch.testing.assert_close(features(b, x), want, rtol=0, atol=0)


def test_no_stages_hooks_or_last_relu():
    b = small_vit()
    x = torch.randn(1, 3, 16, 16)
    for call in (lambda: b(x, stage_hook=lambda n, t: t), lambda: b(x, return_stages=True), lambda: b.stem(x),
                 b.stage_channels, b.remove_last_relu):
        with pytest.raises(UserError, match="Vision Transformer.*use a ResNet backbone") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="built for 16x16 images, got 8x8; set img_size=16"):
        b(torch.randn(1, 3, 8, 8))


def test_backbone_kwargs_take_img_size_else_the_data_side(make_cfg):
    class Scenario:
        class train:
            size = 8

    cfg = make_cfg(backbone="vit_cpu", vit_depth=2)
    assert backbone_kwargs(cfg) == dict(img_size=None, vit_patch_size=8, vit_embed_dim=64, vit_depth=2, vit_heads=4)
    assert backbone_kwargs(cfg, Scenario)["img_size"] == 8
    assert backbone_kwargs(make_cfg(img_size=16), Scenario)["img_size"] == 16


# ---------------------------------------------------------------- local checkpoints


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = randomized(small_vit())
    x = torch.randn(2, 3, 16, 16)
    for name, state in (("timm.safetensors", src.vit.state_dict()), ("ours.safetensors", src.state_dict())):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
        loaded = build_backbone("vit_cpu", str(tmp_path / name), **SMALL).eval()
        torch.testing.assert_close(features(loaded, x), features(src, x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap, suffix", [("plain", ".pth"), ("model", ".pt"), ("state_dict", ".bin"),
                                          ("module", ".pth")])
def test_torch_checkpoint_round_trip_drops_the_head(tmp_path, wrap, suffix):
    src = randomized(small_vit())
    state = dict(src.vit.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(10, 32), torch.randn(10)  # a classifier: dropped
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap != "plain":
        state = {wrap: state, "epoch": 3}
    path = tmp_path / f"w{suffix}"
    torch.save(state, path)
    x = torch.randn(2, 3, 16, 16)
    loaded = build_backbone("vit_cpu", str(path), **SMALL).eval()
    torch.testing.assert_close(features(loaded, x), features(src, x), rtol=0, atol=0)


def write_google_npz(vit: VisionTransformer, path) -> None:
    """A timm ViT's weights in the original Google ViT .npz layout (the inverse of timm's _load_weights)."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d = vit.embed_dim
    h = vit.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": np.zeros((d, 7), np.float32), "head/bias": np.zeros(7, np.float32)}
    for i in range(len(vit.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[mha + f"{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            w[mha + f"{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in w.items()})


def test_google_npz_round_trip(tmp_path):
    src = randomized(small_vit())
    path = tmp_path / "ViT-tiny.npz"
    write_google_npz(src.vit, path)
    loaded = build_backbone("vit_cpu", str(path), **SMALL).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(features(loaded, x), features(src, x), rtol=1e-5, atol=1e-5)
    # at another image size the position embedding is resampled (timm's loader)
    bigger = build_backbone("vit_cpu", str(path), **{**SMALL, "img_size": 24}).eval()
    assert tuple(bigger.vit.pos_embed.shape) == (1, 37, 32)
    assert features(bigger, torch.randn(2, 3, 24, 24)).shape == (2, 32)


def test_google_npz_of_another_architecture_is_one_line(tmp_path):
    src = small_vit()
    write_google_npz(src.vit, tmp_path / "two.npz")
    with pytest.raises(UserError, match="the file has 2 transformer blocks, the backbone 1") as err:
        build_backbone("vit_cpu", str(tmp_path / "two.npz"), **{**SMALL, "vit_depth": 1})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="lacks 'Transformer/encoderblock_2/LayerNorm_0/scale'"):
        build_backbone("vit_cpu", str(tmp_path / "two.npz"), **{**SMALL, "vit_depth": 3})
    with pytest.raises(UserError, match=r"patch_embed.proj.weight has shape \(32, 3, 4, 4\) in the file vs \(64, 3, 4, 4\)"):
        build_backbone("vit_cpu", str(tmp_path / "two.npz"), **{**SMALL, "vit_embed_dim": 64})
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 3)))
    with pytest.raises(UserError, match="is not an original Google ViT .npz"):
        build_backbone("vit_cpu", str(tmp_path / "other.npz"), **SMALL)


def test_missing_or_wrongly_shaped_key_is_one_line_naming_it(tmp_path):
    state = dict(small_vit().vit.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"do not match backbone vit_cpu: 1 missing keys \(e.g. blocks.1.mlp.fc2.bias\)") as err:
        build_backbone("vit_cpu", str(tmp_path / "missing.pth"), **SMALL)
    assert "\n" not in str(err.value)

    state = dict(small_vit().vit.state_dict())
    state["blocks.0.attn.qkv.weight"] = torch.zeros(96, 16)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match=r"wrong shape \(e.g. blocks.0.attn.qkv.weight: \(96, 16\) vs \(96, 32\)\)"):
        build_backbone("vit_cpu", str(tmp_path / "wrong.pth"), **SMALL)

    with pytest.raises(UserError, match="does not exist"):
        build_backbone("vit_cpu", str(tmp_path / "nope.safetensors"), **SMALL)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot be loaded as safetensors"):
        build_backbone("vit_cpu", str(tmp_path / "bad.safetensors"), **SMALL)


def test_checkpoint_at_another_image_size_is_resampled(tmp_path):
    src = randomized(small_vit(img_size=32))  # 8x8 grid
    torch.save(src.vit.state_dict(), tmp_path / "at32.pth")
    loaded = build_backbone("vit_cpu", str(tmp_path / "at32.pth"), **SMALL).eval()  # 4x4 grid
    assert tuple(loaded.vit.pos_embed.shape) == (1, 17, 32)
    assert torch.equal(loaded.vit.pos_embed[:, 0], src.vit.pos_embed[:, 0])  # the CLS position is kept
    assert torch.equal(loaded.vit.blocks[1].mlp.fc1.weight, src.vit.blocks[1].mlp.fc1.weight)
    assert features(loaded, torch.randn(2, 3, 16, 16)).shape == (2, 32)


# ---------------------------------------------------------------- pretrained: true


@pytest.fixture
def offline_timm(monkeypatch):
    """Every timm download raises, as without network."""
    import timm.models._builder as builder

    def fail(*a, **k):
        raise OSError("no network")

    for name in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        monkeypatch.setattr(builder, name, fail)


def test_pretrained_true_offline_is_one_line_naming_the_timm_weights(offline_timm):
    with pytest.raises(UserError, match=r"vit_tiny_patch16_224\.augreg_in21k_ft_in1k \(OSError\); download them "
                                        r"elsewhere \(https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
                                        r".*set pretrained=PATH") as err:
        build_backbone("vit_tiny_patch16_224", True, img_size=32)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"weights vit_tiny_patch16_224\.augreg_in21k \(OSError\)"):
        build_backbone("vit_tiny_patch16_224.augreg_in21k", True, img_size=32)
    with pytest.raises(UserError, match="no downloadable pretrained weights for backbone 'vit_cpu'"):
        build_backbone("vit_cpu", True, **SMALL)


def test_pretrained_true_loads_the_tagged_weights_resampled_without_head(monkeypatch):
    import timm
    import timm.models._builder as builder

    torch.manual_seed(1)
    hub = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # 224 px, with its 1000-class head
    asked = []

    def from_hf(repo, *a, **k):
        asked.append(repo)
        return hub.state_dict()

    monkeypatch.setattr(builder, "load_state_dict_from_hf", from_hf)
    b = build_backbone("vit_tiny_patch16_224.augreg_in21k", True, img_size=32).eval()
    assert asked == ["timm/vit_tiny_patch16_224.augreg_in21k"]
    assert tuple(b.vit.pos_embed.shape) == (1, 5, 192)
    assert torch.equal(b.vit.blocks[3].attn.qkv.weight, hub.blocks[3].attn.qkv.weight)
    assert features(b, torch.randn(1, 3, 32, 32)).shape == (1, 192)


# ---------------------------------------------------------------- cost


def vit_macs(img: int, patch: int, dim: int, depth: int, mlp_ratio: float, channels: int = 3) -> float:
    """Closed-form multiply-accumulates of a ViT forward (convolution + linear layers + attention
    matmuls; LayerNorm, softmax and GELU left out)."""
    patches = (img // patch) ** 2
    n = patches + 1
    per_block = n * dim * 3 * dim + n * dim * dim + 2 * n * mlp_ratio * dim * dim + 2 * n * n * dim
    return patches * dim * channels * patch * patch + depth * per_block


@pytest.mark.parametrize("fused", [True, False])
def test_count_flops_of_vit_cpu_matches_the_formula(fused):
    b = build_backbone("vit_cpu", img_size=32).eval()  # defaults: patch 8, width 64, 5 blocks, MLP ratio 2
    for blk in b.vit.blocks:  # PyTorch's counter skips the fused CPU attention kernel: cost.py counts it
        blk.attn.fused_attn = fused
    flops = count_flops(b, torch.randn(1, 3, 32, 32))
    assert flops == pytest.approx(2 * vit_macs(32, 8, 64, 5, 2.0), rel=0.01)


def test_vit_base_patch16_224_costs_17_56_gmacs():
    with torch.device("meta"):  # no weights: the count needs shapes only
        b = build_backbone("vit_base_patch16_224", img_size=224)
        x = torch.empty(1, 3, 224, 224)
    gmacs = count_flops(b.eval(), x) / 2 / 1e9
    assert gmacs == pytest.approx(17.56, rel=0.005)
    assert gmacs == pytest.approx(vit_macs(224, 16, 768, 12, 4.0) / 1e9, rel=0.01)


# ---------------------------------------------------------------- methods on a ViT


def test_normalize_none_feeds_pixels_in_0_1(make_cfg):
    from dynammo.data import load_data
    from dynammo.data.transforms import make_transforms

    cfg = make_cfg(dataset="digits", normalize="none", pretrained=False, max_train_per_class=5)
    data = load_data(cfg, 0)
    assert data.mean == (0.0,) and data.std == (1.0,)
    _, test = make_transforms(data, augment=False)
    x = test(data.train.images[:20])
    assert x.shape[1] == 3 and x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x[:, :1], data.train.images[:20].float() / 255)


def test_a_method_builds_the_vit_for_the_data_side_when_img_size_is_unset():
    from method_helpers import make_method

    m = make_method("finetune", backbone="vit_cpu", img_size=None, vit_patch_size=4, vit_embed_dim=32, vit_depth=1,
                    vit_heads=2)
    assert m.net.backbone.img_size == 8  # digits' own side


@pytest.mark.parametrize("name, kw", [("acl", {}), ("dynammo", {}), ("podnet", {}), ("podnet", {"last_relu": True}),
                                      ("ucir", {})])
def test_methods_that_need_stages_refuse_a_vit_in_one_line_before_writing(name, kw, tmp_path, capsys):
    from dynammo.cli import main
    from method_helpers import tiny_run_args

    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), *tiny_run_args(name, **VIT_RUN, **kw)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert f"method '{name}' needs" in err and "backbone 'vit_cpu'" in err and "use a ResNet backbone" in err
    assert ("or set last_relu=true" in err) == (name == "ucir")
    assert not out.exists()


def test_ucir_with_last_relu_runs_on_a_vit(make_cfg):
    from method_helpers import make_method

    m = make_method("ucir", **VIT_RUN, last_relu=True)
    assert isinstance(m.net.backbone, ViTBackbone)


@pytest.mark.parametrize("name", ["finetune", "replay", "der_pp"])
def test_short_real_run_on_vit_cpu(run_in_process, name, tmp_path):
    from method_helpers import tiny_run_args

    out = tmp_path / name
    assert run_in_process("run", "--out", str(out), *tiny_run_args(name, **VIT_RUN)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["backbone"] == "vit_cpu"
    assert len(res["tasks"]) == len(res["acc"]) == len(res["acc_matrix"]) == 3
    for value in [res["avg_acc"], res["last_acc"], *res["acc"], *res["task_il_acc"]]:
        assert 0.0 <= value <= 100.0
    assert res["avg_acc"] == pytest.approx(sum(res["acc"]) / 3)
    assert res["last_acc"] == res["acc"][-1] and res["acc_matrix"][0][0] == res["acc"][0]
    # the recorded inference cost is the ViT's closed formula plus the 10-class linear head
    head_flops = 2 * 32 * 10
    assert res["cost"][-1]["inference_gflops"] * 1e9 == pytest.approx(2 * vit_macs(16, 4, 32, 2, 2.0) + head_flops,
                                                                      rel=1e-6)
