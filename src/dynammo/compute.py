"""How the engine computes: the autocast dtype (or none) and the memory layout of the images,
chosen from the config keys `amp` and `memory_format` and from what the device does fast.

`auto` (the default of both keys) picks the fastest correct path for the hardware:
- a CPU with bf16 units (AVX512-BF16 or AMX-BF16): bf16 autocast on channels-last images
  (docs/performance.md has the measured training images/s);
- any other CPU: fp32 on contiguous (NCHW) images, the exact path of earlier versions;
- CUDA: bf16 autocast where the GPU has native bf16 (compute capability 8.0+), else fp16 autocast
  with a GradScaler on GPUs with tensor cores (7.0+), else fp32; channels-last under autocast
  (tensor-core convolutions are NHWC);
- MPS and others: fp32, contiguous.
`true` / `false` / `channels_last` / `contiguous` force a choice whatever the hardware; with
`memory_format: auto`, channels-last goes with autocast only, so `amp: false` alone is the fp32 NCHW path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from dynammo.errors import UserError

AMP_VALUES = ("auto", "true", "false")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# /proc/cpuinfo flags of the x86 units that run bf16 matrix products at (at least) twice the fp32 rate
BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
# set to 0 or 1 to override the probe (the test suite pins 0: the exact fp32 path on every machine)
BF16_ENV = "DYNAMMO_CPU_BF16"


def cpu_bf16_units() -> Optional[str]:
    """The CPU's bf16 units ("AMX-BF16", "AVX512-BF16"), or None when it has none. One small
    function so that tests can monkeypatch the hardware."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return f"{BF16_ENV}={forced}" if forced == "1" else None
    return _probe_cpu_bf16()


def _probe_cpu_bf16() -> Optional[str]:
    # torch.backends.cpu.get_cpu_capability() only says "AVX512" (the same on CPUs with and without
    # bf16), and oneDNN's own bf16 check also accepts plain AVX-512, where bf16 is emulated and no
    # faster than fp32. torch.cpu's CPUID probes (cpuinfo library, any OS) tell the units apart;
    # /proc/cpuinfo is the fallback for torch versions without them.
    cpu = torch.cpu
    probes = (("_is_amx_tile_supported", "AMX-BF16"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
    if all(hasattr(cpu, name) for name, _ in probes):
        return next((unit for name, unit in probes if getattr(cpu, name)()), None)
    flags = _cpuinfo_flags()
    return next((unit for flag, unit in BF16_FLAGS if flag in flags), None)


def _cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cuda_amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 on GPUs with native bf16, fp16 on GPUs with tensor cores, else None (fp32 is faster)."""
    try:
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3: no emulation flag
        native_bf16 = torch.cuda.is_bf16_supported()
    if native_bf16:
        return torch.bfloat16
    return torch.float16 if torch.cuda.get_device_capability(device) >= (7, 0) else None


@dataclass(frozen=True)
class ComputePath:
    device_type: str
    amp_dtype: Optional[torch.dtype]  # the autocast dtype; None: fp32
    channels_last: bool  # images (and so every convolution's activations) in NHWC layout
    reason: str  # why, in words: the explicit keys and what the hardware has

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.device_type == "cuda" and self.amp_dtype == torch.float16

    @property
    def precision(self) -> str:
        names = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
        return names.get(self.amp_dtype, "fp32")

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def describe(self) -> str:
        """One line for the log: "bf16 autocast, channels_last (CPU has AVX512-BF16)"."""
        return f"{self.precision}, {self.memory_format} ({self.reason})"

    def record(self) -> dict:
        """results.json `compute`."""
        dtype = None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
        return {"amp_dtype": dtype, "memory_format": self.memory_format, "grad_scaler": self.uses_grad_scaler,
                "description": self.describe()}

    def prepare_module(self, module: Optional[torch.nn.Module]):
        """On the channels-last path, convert the module's 4-D weights to channels-last in place (the
        same Parameter objects, so optimisers and parameter lists stay valid): a convolution then
        needs no weight reorder per call. Idempotent and cheap; a no-op otherwise."""
        if self.channels_last and module is not None:
            module.to(memory_format=torch.channels_last)
        return module

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.amp_dtype)


def _key(cfg, key: str, values: tuple) -> str:
    """The key's value as one of `values` (a bool amp of an older config reads as true/false)."""
    v = cfg.get(key, "auto")
    if isinstance(v, bool):
        v = "true" if v else "false"
    if not isinstance(v, str) or v.lower() not in values:
        raise UserError(f"config key '{key}' must be one of {', '.join(values)}, got {v!r}; "
                        f"fix it in the YAML file or as {key}=VALUE")
    return v.lower()


def _hardware(device: torch.device) -> tuple:
    """(autocast dtype auto picks, whether auto picks channels-last under autocast, the reason in words)."""
    if device.type == "cpu":
        units = cpu_bf16_units()
        if units:
            return torch.bfloat16, True, f"CPU has {units}"
        return None, False, "CPU has no bf16 units"
    if device.type == "cuda":
        dtype = _cuda_amp_dtype(device)
        name = torch.cuda.get_device_name(device)
        if dtype is None:
            return None, False, f"{name} has no tensor cores"
        return dtype, True, f"{name} has {'native bf16' if dtype == torch.bfloat16 else 'fp16 tensor cores'}"
    return None, False, f"no automatic mixed precision on {device.type}"


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.isdigit():  # reference-framework style: a GPU index
        name = f"cuda:{name}"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"device '{name}' is not valid; use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' asked for but CUDA is not available here; use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s); pick another index")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("device 'mps' asked for but MPS is not available here; use device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device '{name}' is not supported; use cpu, cuda, cuda:N or mps")
    return dev


def compute_path(cfg, device: torch.device) -> ComputePath:
    """The path of a run on `device` under the config's `amp` and `memory_format`."""
    amp, fmt = _key(cfg, "amp", AMP_VALUES), _key(cfg, "memory_format", MEMORY_FORMATS)
    auto_dtype, auto_cl, hardware = _hardware(device) if "auto" in (amp, fmt) else (None, False, "")
    if amp == "auto":
        dtype = auto_dtype
    elif amp == "true":  # forced: what auto would pick where the device has one, else bf16 (emulated if need be)
        dtype = (_cuda_amp_dtype(device) or torch.float16) if device.type == "cuda" else torch.bfloat16
    else:
        dtype = None
    # auto: channels-last only under autocast (where it was measured faster); amp=false alone keeps
    # the exact fp32 NCHW path of earlier versions
    channels_last = (auto_cl and dtype is not None) if fmt == "auto" else fmt == "channels_last"
    parts = [f"{k}={v}" for k, v in (("amp", amp), ("memory_format", fmt)) if v != "auto"] + [hardware]
    return ComputePath(device.type, dtype, channels_last, "; ".join(p for p in parts if p))


def compute_record(cfg) -> dict:
    """results.json `compute` of a run of `cfg` (on cfg.device, which the runner sets to the run's)."""
    return compute_path(cfg, resolve_device(cfg.device)).record()
