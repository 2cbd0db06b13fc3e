"""Optimizer and learning-rate schedule of the training loop.

The optimizers are bitsandbytes' (paged) 8-bit / 32-bit AdamW or torch's AdamW. Paged optimizers
need CUDA unified memory; on the CPU we pick the non-paged twin ourselves and say so once, instead of
letting bitsandbytes warn on every parameter.
"""

from __future__ import annotations

import logging
import math

import torch

from qlora_lite.kernels.bnb_import import bnb

log = logging.getLogger(__name__)
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw")
SCHEDULERS = ("cosine", "linear", "constant")


def resolve_optimizer_name(name: str, device_type: str) -> str:
    """The optimizer that really runs: paged ones become non-paged off CUDA (with one log line).

    Raises:
        ValueError: unknown optimizer name.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name.startswith("paged_") and device_type != "cuda":
        plain = name.removeprefix("paged_")
        log.warning("%s needs a CUDA GPU (paging uses unified memory); using %s on the %s", name, plain, device_type)
        return plain
    return name


def lora_plus_groups(named_params: list[tuple[str, torch.nn.Parameter]], ratio: float) -> list[dict]:
    """Parameter groups for LoRA+ (Hayou et al., 2024): the B matrices at ``ratio`` times the learning
    rate of everything else. ``lr_scale`` is each group's factor on ``--lr`` (kept in the optimizer state,
    so a resumed run scales the same way). One group when ``ratio`` is 1, as plain LoRA trains."""
    params = [p for _, p in named_params]
    if ratio == 1.0:
        return [{"params": params, "lr_scale": 1.0}]
    is_b = ["lora_B" in name for name, _ in named_params]
    groups = [{"params": [p for p, b in zip(params, is_b) if not b], "lr_scale": 1.0},
              {"params": [p for p, b in zip(params, is_b) if b], "lr_scale": ratio}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    params: list[torch.nn.Parameter] | list[dict], name: str, lr: float, weight_decay: float = 0.0,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    """Build the optimizer for the trainable (LoRA) parameters.

    Args:
        params: the parameters to train (non-empty), or groups of them (``lora_plus_groups``), each group
            at ``lr * group["lr_scale"]``.
        name: one of OPTIMIZERS.
        device_type: "cuda", "cpu", ...: decides whether paged optimizers are possible.

    Raises:
        ValueError: unknown optimizer name or no trainable parameter.
    """
    if params and isinstance(params[0], dict):
        params = [{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in params if g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameter (no LoRA layer was added?)")
    name = resolve_optimizer_name(name, device_type)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    cls = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_32bit": bnb.optim.AdamW32bit,
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def apply_current_settings(optimizer: torch.optim.Optimizer, scheduler, lr: float, weight_decay: float) -> None:
    """After a resume: make this run's peak ``lr`` and ``weight_decay`` take effect.

    The restored optimizer and scheduler states carry the old run's values (param groups, base_lrs);
    resume allows both to change, so they are set again here. The schedule's shape already comes
    from the rebuilt LambdaLR; only its restored step count is kept.
    """
    scheduler.base_lrs = [lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)  # as LambdaLR computes it
        group["weight_decay"] = weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() returns


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Linear warmup from 0 over ``warmup_steps``, then cosine or linear decay to 0 at ``total_steps``,
    or constant. The same numbers as transformers' ``get_*_schedule_with_warmup``.
    """
    if schedule not in SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {schedule!r}; choose one of {', '.join(SCHEDULERS)}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step; its state_dict is plain numbers (resumable).

    Raises:
        ValueError: unknown schedule name.
    """
    lr_factor(0, warmup_steps, total_steps, schedule)  # validates the name before building
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule)
    )
