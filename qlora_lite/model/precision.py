"""Which dtype the matmuls run in: the one this device runs fast, unless the user asked for another.

Why: a bf16 matmul is fast on GPUs with bf16 support and on CPUs with oneDNN bf16 kernels (AVX512-BF16
or AMX), but on a CPU without them (AVX2: most laptops) torch falls back to scalar code that runs
orders of magnitude below the fp32 rate. So ``auto`` means:

- CUDA: bf16 where the GPU supports it, else fp16;
- CPU: bf16 with AMX or AVX512-BF16, fp32 without oneDNN bf16 kernels, and, where torch's report is
  ambiguous (oneDNN claims bf16 but the CPU has no bf16 instructions, e.g. AVX512 without BF16), a
  timed matmul probe of a few milliseconds decides.

An explicit bf16/fp16 is honoured; on a device slow at it, ``slow_dtype_warning`` says by how much.
``estimated_compute_dtype`` gives the same answer without importing torch (for ``qlora-lite estimate``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


CHOICES = ("auto", "bf16", "fp16", "fp32")
# The torch dtype of each name (``model.loading.DTYPES`` holds the dtypes themselves; this module stays
# torch-free at import, for ``qlora-lite estimate``).
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved compute dtype and the reason, for the log line that says what was chosen."""

    name: str  # bf16, fp16 or fp32
    reason: str


def cpu_features() -> dict:
    """What torch reports about this CPU's low-precision matmul support."""
    import torch  # noqa: PLC0415 (torch-free at import, for qlora-lite estimate)

    def flag(name: str) -> bool:
        probe = getattr(torch.cpu, name, None)
        return bool(probe()) if probe is not None else False

    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "avx512_bf16": flag("_is_avx512_bf16_supported"), "amx": flag("_is_amx_tile_supported"),
            "amx_fp16": flag("_is_amx_fp16_supported")}


@functools.lru_cache(maxsize=None)
def matmul_speedup(dtype_name: str, size: int = 128, repeats: int = 5) -> float:
    """How many times faster a (size x size) @ (size x size) matmul runs in ``dtype_name`` than in
    fp32 on this CPU (best of ``repeats``; under 1 means slower). Takes milliseconds."""
    import torch  # noqa: PLC0415 (torch-free at import, for qlora-lite estimate)

    def best_seconds(dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # first call: kernel selection and allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return max(min(times), 1e-9)

    return best_seconds(torch.float32) / best_seconds(getattr(torch, TORCH_NAMES[dtype_name]))


def _cpu_choice(features: dict) -> DtypeChoice:
    cpu = f"CPU ({features['capability']})"
    if not features["onednn_bf16"]:  # whatever the instructions: oneDNN will not use them (e.g. ONEDNN_MAX_CPU_ISA)
        has = [kind for kind, key in (("AMX", "amx"), ("AVX512-BF16", "avx512_bf16")) if features[key]]
        why = (f"has {' and '.join(has)} but oneDNN does not use them (ONEDNN_MAX_CPU_ISA, or a virtual machine "
               "hiding them)") if has else "has no bf16 matmul kernels (no AVX512-BF16 or AMX)"
        return DtypeChoice("fp32", f"{cpu} {why}: fp32 is many times faster there")
    if features["amx"] or features["avx512_bf16"]:
        kind = "AMX" if features["amx"] else "AVX512-BF16"
        return DtypeChoice("bf16", f"{cpu} has {kind}: oneDNN runs bf16 matmuls faster than fp32")
    speedup = matmul_speedup("bf16")
    if speedup >= 1.0:
        return DtypeChoice("bf16", f"{cpu} ran a bf16 test matmul {speedup:.1f}x as fast as fp32")
    return DtypeChoice("fp32", f"{cpu} ran a bf16 test matmul at {speedup:.2f}x the fp32 speed")


def choose_compute_dtype(requested: str = "auto", device: str = "cpu") -> DtypeChoice:
    """The compute dtype to use on ``device`` ("cpu" or "cuda") for ``requested`` (auto or a dtype).

    Raises:
        ValueError: an unknown dtype name.
    """
    if requested not in CHOICES:
        raise ValueError(f"compute dtype must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested != "auto":
        return DtypeChoice(requested, "as requested")
    if device == "cuda":
        import torch  # noqa: PLC0415 (torch-free at import, for qlora-lite estimate)

        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bf16", f"{torch.cuda.get_device_name()} supports bf16")
        return DtypeChoice("fp16", f"{torch.cuda.get_device_name()} has no bf16: fp16 with a loss scaler")
    return _cpu_choice(cpu_features())


def lora_dtype_for(requested: str, compute_dtype: str) -> str:
    """The adapter weights' dtype: ``auto`` follows the compute dtype (so the fused 4-bit path applies),
    except under fp16, whose loss scaler needs fp32 master weights."""
    if requested != "auto":
        return requested
    return "fp32" if compute_dtype == "fp16" else compute_dtype


def default_device() -> str:
    import torch  # noqa: PLC0415 (torch-free at import, for qlora-lite estimate)

    return "cuda" if torch.cuda.is_available() else "cpu"


def slow_dtype_warning(dtype_name: str, device: str) -> str | None:
    """A warning when ``dtype_name`` runs slowly on ``device`` (a CPU without kernels for it), saying
    how much slower than fp32 a test matmul ran here; None when it is fine."""
    if device != "cpu" or dtype_name == "fp32":
        return None
    features = cpu_features()
    if dtype_name == "bf16" and _cpu_choice(features).name == "bf16":
        return None
    if dtype_name == "fp16" and features["amx_fp16"]:
        return None
    speedup = matmul_speedup(dtype_name)
    if speedup >= 0.8:
        return None
    return (f"{dtype_name} matmuls run {1 / speedup:.0f}x slower than fp32 on this CPU "
            f"({features['capability']}, no {dtype_name} kernels); --compute-dtype auto would use fp32")


def estimated_compute_dtype(requested: str, device: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``choose_compute_dtype`` without importing torch, for memory estimates: the CPU's flags from
    /proc/cpuinfo (torch decides from the same instructions); without them, torch decides."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16"  # fp16 where bf16 is missing: the same 2 bytes per value
    try:
        flags = set()
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        flags = set()
    if not flags:
        return choose_compute_dtype("auto", "cpu").name
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()  # oneDNN's ISA names: *_BF16, *_AMX*, ALL keep bf16
    capped = isa != "ALL" and "BF16" not in isa and "AMX" not in isa
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} and not capped else "fp32"


def resolve_compute_dtype(requested: str, device: str | None = None) -> str:
    """``requested`` as a concrete dtype name for ``device`` (default: where this process trains),
    logging what ``auto`` chose and why, and warning when an explicit dtype is slow there."""
    device = device or default_device()
    choice = choose_compute_dtype(requested, device)
    if requested == "auto":
        log.info("compute dtype auto -> %s: %s", choice.name, choice.reason)
    elif warning := slow_dtype_warning(choice.name, device):
        log.warning("--compute-dtype %s: %s", choice.name, warning)
    return choice.name

