"""Making a run fit: the settings that bring the estimate within a budget, and what
``checkpoint_policy: auto`` chooses from the memory free now."""

from __future__ import annotations

from pathlib import Path

from qlora_lite.kernels.footprint import NO_CHECKPOINTING
from qlora_lite.model.precision import estimated_compute_dtype
from qlora_lite.train.estimate import MemoryEstimate, estimate_memory

# Checkpointing that would lower the peak by less than this share of it only costs time: the recompute
# and the per-op dispatch of selective checkpointing make small models' steps much slower for it.
CHECKPOINTING_WORTH = 0.10


def suggest_settings(config: dict | str | Path, budget: int, **settings) -> tuple[dict, MemoryEstimate] | None:
    """The smallest set of changes to ``settings`` that brings the estimate within ``budget``.

    Levers are tried in order of what they cost the user: checkpointing, a checkpoint policy that keeps
    less, an 8-bit optimizer, 4-bit base, smaller micro-batch, shorter sequences, lower rank.

    Returns:
        ``(changes, estimate)`` where changes maps setting -> new value (empty when it already
        fits), or None when nothing within these levers fits.
    """
    current = dict(settings)
    estimate = estimate_memory(config, **current)
    changes: dict = {}
    levers = [("gradient_checkpointing", [True]), ("checkpoint_policy", ["balanced", "memory"]),
              ("optimizer", ["paged_adamw_8bit" if current.get("device") == "cuda" else "adamw_8bit"]),
              ("bits", [4]), ("batch_size", _halvings(current.get("batch_size", 1), 1)),
              ("seq_len", _halvings(current.get("seq_len", 512), 128)), ("rank", _halvings(current.get("rank", 16), 4))]
    for name, values in levers:
        for value in values:
            if estimate.fits(budget):
                return changes, estimate
            trial = estimate_memory(config, **{**current, name: value})
            if trial.total < estimate.total:
                current[name], changes[name], estimate = value, value, trial
    return (changes, estimate) if estimate.fits(budget) else None


def longest_sequence(config: dict | str | Path, budget: int, limit: int = 1 << 20, **settings) -> int:
    """The longest ``seq_len`` whose estimated peak fits ``budget`` with the other ``settings`` as they
    are (bisection; the estimate grows with the length). 0 when not even 1 token fits; at most ``limit``.
    """
    if not estimate_memory(config, **{**settings, "seq_len": 1}).fits(budget):
        return 0
    low, high = 1, limit
    if estimate_memory(config, **{**settings, "seq_len": high}).fits(budget):
        return high
    while high - low > 1:  # fits at low, not at high
        mid = (low + high) // 2
        low, high = (mid, high) if estimate_memory(config, **{**settings, "seq_len": mid}).fits(budget) else (low, mid)
    return low


def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


def estimate_settings(config, device: str) -> dict:
    """The ``estimate_memory`` keyword arguments of the run a ``config.Config`` describes (training and
    ``qlora-lite estimate`` read a config the same way)."""
    t = config.train
    return dict(bits=config.model.bits, seq_len=config.data.max_seq_len, batch_size=t.batch_size,
                rank=config.lora.rank, target_modules=config.lora.target_modules, dora=config.lora.dora,
                gradient_checkpointing=t.gradient_checkpointing, checkpoint_policy=t.checkpoint_policy,
                optimizer=t.optimizer, num_processes=t.num_processes, fsdp=t.fsdp,
                double_quant=config.model.double_quant, device=device,
                compute_dtype=estimated_compute_dtype(config.model.compute_dtype, device),
                sequences_per_example=1 if t.method == "sft" else 2)  # dpo, orpo: a pair is two sequences


def available_memory(device: str) -> int | None:
    """Bytes a training run can still take: free CUDA memory, or the OS's MemAvailable on Linux.

    Returns None where it cannot be read (e.g. macOS has no /proc/meminfo).
    """
    if device == "cuda":
        import torch  # noqa: PLC0415 (torch-free at import, for qlora-lite estimate)

        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_checkpoint_policy(config: dict | str | Path, available: int | None, *, share: float | None = None,
                             **settings) -> tuple[str, MemoryEstimate | None]:
    """What ``checkpoint_policy: auto`` runs: the fastest policy whose estimated peak takes at most
    ``share`` of the ``available`` bytes (speed, then balanced, else memory), or no checkpointing at
    all when that fits too and checkpointing would save less than ``CHECKPOINTING_WORTH`` of the peak
    (small models and short sequences, where the recompute costs time and saves nothing that matters).

    ``share`` defaults to half of free RAM (the estimate is within ~15%, and the user's other programs
    need memory too; every process of a multi-process CPU run draws from it) and to 75% of free GPU
    memory, which nothing else uses but whose allocator fragments (the estimate is checked on the CPU
    only so far).

    Args:
        settings: ``estimate_memory`` keyword arguments (bits, seq_len, batch_size, ...).

    Returns:
        ``(policy, estimate of that policy)``: a ``KEPT_PER_BLOCK`` name or ``NO_CHECKPOINTING``;
        balanced and no estimate when ``available`` is None.
    """
    if available is None:
        return "balanced", None
    on_cpu = settings.get("device", "cpu") == "cpu"
    share = share if share is not None else (0.5 if on_cpu else 0.75)
    processes = settings.get("num_processes", 1) if on_cpu else 1
    settings = {**settings, "gradient_checkpointing": True}
    unchecked = estimate_memory(config, **{**settings, "checkpoint_policy": NO_CHECKPOINTING})
    for policy in ("speed", "balanced"):
        estimate = estimate_memory(config, **{**settings, "checkpoint_policy": policy})
        if estimate.total * processes <= share * available:
            if (unchecked.total * processes <= share * available
                    and unchecked.total <= (1 + CHECKPOINTING_WORTH) * estimate.total):
                return NO_CHECKPOINTING, unchecked
            return policy, estimate
    return "memory", estimate_memory(config, **{**settings, "checkpoint_policy": "memory"})
