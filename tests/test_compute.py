"""The compute path (compute.py): which autocast dtype and image layout `amp` / `memory_format`
pick on each side of the hardware, that channels-last changes no output, and that a run says
which path it took in its log and results.json. The hardware probe is monkeypatched; the rest
of the suite runs with it pinned to "no bf16 units" (conftest.py)."""
from __future__ import annotations

import json

import pytest
import torch

import dynammo.compute as compute
from dynammo.cli import main
from dynammo.compute import ComputePath, compute_path
from dynammo.configure import build_config
from dynammo.data.transforms import BatchTransform
from dynammo.engine import Engine
from dynammo.errors import UserError
from dynammo.models.backbones import build_backbone

from method_helpers import tiny_run_args

CPU = torch.device("cpu")


@pytest.fixture
def cpu_units(monkeypatch):
    """cpu_units(name or None): the CPU's bf16 units as the probe reports them."""

    def set_units(units):
        monkeypatch.setattr(compute, "cpu_bf16_units", lambda: units)

    return set_units


def path(**keys) -> ComputePath:
    return compute_path(build_config(keys), CPU)


def test_a_cpu_with_bf16_units_gets_bf16_autocast_on_channels_last(cpu_units):
    cpu_units("AMX-BF16")
    p = path()
    assert (p.amp_dtype, p.channels_last, p.uses_grad_scaler) == (torch.bfloat16, True, False)
    assert p.describe() == "bf16 autocast, channels_last (CPU has AMX-BF16)"
    assert p.record() == {"amp_dtype": "bfloat16", "memory_format": "channels_last", "grad_scaler": False,
                          "description": p.describe()}


def test_a_cpu_without_bf16_units_keeps_fp32_contiguous(cpu_units):
    cpu_units(None)
    p = path()
    assert (p.amp_dtype, p.channels_last) == (None, False)
    assert p.describe() == "fp32, contiguous (CPU has no bf16 units)"
    assert p.record()["amp_dtype"] is None


@pytest.mark.parametrize("units", ["AVX512-BF16", None])
@pytest.mark.parametrize("keys,dtype,channels_last", [
    ({"amp": "false"}, None, False),  # amp=false alone: the fp32 NCHW path of earlier versions
    ({"amp": False}, None, False),  # a YAML boolean
    ({"amp": "false", "memory_format": "channels_last"}, None, True),
    ({"amp": "true", "memory_format": "contiguous"}, torch.bfloat16, False),
    ({"amp": True, "memory_format": "channels_last"}, torch.bfloat16, True),
])
def test_explicit_keys_override_auto_on_either_cpu(cpu_units, units, keys, dtype, channels_last):
    cpu_units(units)
    p = path(**keys)
    assert (p.amp_dtype, p.channels_last) == (dtype, channels_last)


def test_the_reason_names_the_explicit_keys_and_the_hardware_when_auto_decided(cpu_units):
    cpu_units("AVX512-BF16")
    assert path(amp="false").describe() == "fp32, contiguous (amp=false; CPU has AVX512-BF16)"
    assert path(amp="true", memory_format="contiguous").describe() == \
        "bf16 autocast, contiguous (amp=true; memory_format=contiguous)"
    cpu_units(None)
    assert path(amp="true").describe() == "bf16 autocast, contiguous (amp=true; CPU has no bf16 units)"


@pytest.mark.parametrize("key,value", [("amp", "maybe"), ("amp", 1), ("memory_format", "nhwc")])
def test_an_invalid_value_is_one_line_naming_the_key(key, value):
    with pytest.raises(UserError) as err:
        build_config({key: value})
    assert key in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=key):  # a config that skipped validation
        compute_path({key: value}, CPU)


def test_an_invalid_value_on_the_command_line_exits_2_with_one_line(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r"), "memory_format=nchw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "memory_format" in err[0] and "channels_last" in err[0]
    assert not (tmp_path / "r").exists()


def cuda_gpu(monkeypatch, bf16: bool, capability: tuple):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")


@pytest.mark.parametrize("bf16,capability,dtype,scaler", [
    (True, (9, 0), torch.bfloat16, False),
    (False, (7, 5), torch.float16, True),  # tensor cores without bf16: fp16 needs a GradScaler
    (False, (6, 1), None, False),  # no tensor cores: fp32 is faster
])
def test_cuda_auto_picks_bf16_else_fp16_with_a_grad_scaler(monkeypatch, bf16, capability, dtype, scaler):
    cuda_gpu(monkeypatch, bf16, capability)
    p = compute_path(build_config({}), torch.device("cuda"))
    assert (p.amp_dtype, p.uses_grad_scaler, p.channels_last) == (dtype, scaler, dtype is not None)
    forced = compute_path(build_config({"amp": "true"}), torch.device("cuda"))
    assert forced.amp_dtype == (dtype or torch.float16)
    assert compute_path(build_config({"amp": "false"}), torch.device("cuda")).amp_dtype is None


def test_other_devices_stay_fp32_under_auto():
    p = compute_path(build_config({}), torch.device("mps"))
    assert (p.amp_dtype, p.channels_last) == (None, False)
    assert compute_path(build_config({"amp": "true"}), torch.device("mps")).amp_dtype == torch.bfloat16


def test_the_probe_reads_torch_cpuid_else_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv(compute.BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert compute.cpu_bf16_units() == "AVX512-BF16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert compute.cpu_bf16_units() is None
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # an older torch
    monkeypatch.setattr(compute, "_cpuinfo_flags", lambda: {"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"})
    assert compute.cpu_bf16_units() == "AMX-BF16"
    monkeypatch.setattr(compute, "_cpuinfo_flags", lambda: {"avx2", "avx512f"})
    assert compute.cpu_bf16_units() is None


def test_the_environment_override_wins_over_the_probe(monkeypatch):
    monkeypatch.setattr(compute, "_probe_cpu_bf16", lambda: "AMX-BF16")
    monkeypatch.setenv(compute.BF16_ENV, "0")
    assert compute.cpu_bf16_units() is None
    monkeypatch.setenv(compute.BF16_ENV, "1")
    assert compute.cpu_bf16_units() == "DYNAMMO_CPU_BF16=1"
    monkeypatch.delenv(compute.BF16_ENV)
    assert compute.cpu_bf16_units() == "AMX-BF16"


def test_the_suite_runs_the_fp32_contiguous_path():
    assert path().describe() == "fp32, contiguous (CPU has no bf16 units)"


def test_engine_autocast_follows_the_path(cpu_units):
    lin = torch.nn.Linear(4, 2)
    for units, dtype in (("AVX512-BF16", torch.bfloat16), (None, torch.float32)):
        cpu_units(units)
        engine = Engine(build_config({}), None, CPU, 0)
        with engine.autocast():
            assert lin(torch.ones(1, 4)).dtype == dtype
        assert engine.amp == (dtype == torch.bfloat16)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 rounding in another summation order, relative to the tensor's size (an
    element-wise tolerance fails where train-mode BatchNorm over 4 values of a 1x1 map amplifies it)."""
    return bool((a - b).norm() <= 1e-4 * b.norm())


@pytest.mark.parametrize("name,size", [("resnet32", 16), ("resnet18", 64)])
def test_channels_last_outputs_and_gradients_equal_contiguous(name, size, single_thread):
    torch.manual_seed(0)
    net = build_backbone(name)
    x = torch.randn(4, 3, size, size)
    for train in (True, False):
        net.train(train)
        ref = net(x, return_stages=True)
        feat, stages = net(x.contiguous(memory_format=torch.channels_last), return_stages=True)
        assert close(feat, ref[0])
        # the layout reaches the last stage (resnet18's stem max-pool passes it on)
        assert stages[-1].is_contiguous(memory_format=torch.channels_last) and not stages[-1].is_contiguous()
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        net.zero_grad()
        net(x.contiguous(memory_format=layout)).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(close(b, a) for a, b in zip(*grads))


def test_prepare_module_converts_weights_in_place_on_the_channels_last_path_only():
    net = build_backbone("resnet20")
    params = list(net.parameters())
    ComputePath("cpu", None, False, "").prepare_module(net)
    assert net.conv1.weight.is_contiguous()
    ComputePath("cpu", torch.bfloat16, True, "").prepare_module(net)
    assert all(a is b for a, b in zip(params, net.parameters()))  # optimisers keep their parameters
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last) and not net.conv1.weight.is_contiguous()
    assert ComputePath("cpu", None, True, "").prepare_module(None) is None


def test_batch_transform_layout_and_device_statistics():
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    plain, nhwc = BatchTransform((0.5,), (0.25,)), BatchTransform((0.5,), (0.25,), channels_last=True)
    a, b = plain(x), nhwc(x)
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last) and b.shape == (3, 3, 8, 8)
    mean, std = nhwc.stats_on(CPU)
    assert nhwc.stats_on(CPU)[0] is mean and nhwc.stats_on(CPU)[1] is std  # copied to the device once


def test_a_run_says_its_path_in_the_log_and_results(run_in_process, tmp_path, cpu_units):
    """Both sides through the real `dynammo run`: the suite's fp32 path, and bf16 + channels-last
    as a CPU with bf16 units gets it (trains and evaluates under bf16 autocast to the end)."""
    for units, text in ((None, "fp32, contiguous (CPU has no bf16 units)"),
                        ("AMX-BF16", "bf16 autocast, channels_last (CPU has AMX-BF16)")):
        cpu_units(units)
        out = tmp_path / str(units)
        assert run_in_process("run", "--out", str(out), *tiny_run_args("replay", save_checkpoints="false")) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["status"] == "complete" and results["compute"]["description"] == text
        assert f"compute: {text}" in (out / "log.txt").read_text().splitlines()
        assert 0 <= results["last_acc"] <= 100
