"""Build the model a command works with: quantized frozen base + LoRA (fresh or loaded) + training prep."""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .adapter import load_adapter
from .cpu_attention import use_cpu_attention
from .fastpath import selective_checkpoint_context
from .lora import inject_lora
from .memory import CHECKPOINTING_WORTH, NO_CHECKPOINTING
from .precision import choose_compute_dtype, default_device, lora_dtype_for, slow_dtype_warning
from .quant import DTYPES, load_base_model

log = logging.getLogger(__name__)


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True,
                         checkpoint_policy: str = "balanced") -> nn.Module:
    """Make a frozen (quantized) base trainable through its adapters.

    Non-reentrant checkpointing recomputes each decoder block in the backward pass; unlike the
    reentrant kind it needs no input that requires grad, so a frozen embedding works. The KV cache is
    useless while training and would hold memory, so it is switched off.

    Args:
        checkpoint_policy: memory (recompute whole blocks), balanced or speed (keep more outputs; see
            ``fastpath.selective_checkpoint_context``); ``memory.NO_CHECKPOINTING`` switches it off.
    """
    gradient_checkpointing = gradient_checkpointing and checkpoint_policy != NO_CHECKPOINTING
    model.config.use_cache = False
    model.qlora_checkpoint_policy = checkpoint_policy if gradient_checkpointing else None
    use_cpu_attention(model)  # CPU + SDPA only: blocked bf16 matmuls, ~2.8x faster than the fused kernel there
    # Beyond "memory", the policy keeps some block outputs instead of recomputing them
    # (fastpath.selective_checkpoint_context).
    kwargs = {"use_reentrant": False}
    if checkpoint_policy != "memory":
        kwargs["context_fn"] = functools.partial(selective_checkpoint_context, checkpoint_policy)
    # transformers 5 renamed the switch; older releases only have the gradient_checkpointing_* names.
    if hasattr(model, "activation_checkpointing_enable"):
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
    # transformers also makes the embedding output require grad, which only the reentrant kind needs;
    # with it, the first block would compute input gradients of its projections for nothing.
    if gradient_checkpointing and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    model.train()
    return model


def build_model(
    model_path: str,
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_bin_weights: bool = False,
    adapter: str | None = None,
    target_modules: str = "all-linear",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    rslora: bool = False,
    lora_dtype: str = "auto",
    trainable: bool = True,
    gradient_checkpointing: bool = True,
    checkpoint_policy: str = "balanced",
    seed: int | None = None,
) -> nn.Module:
    """Load the base, then add LoRA: loaded from ``adapter`` when given, else freshly initialised.

    Args:
        compute_dtype: bf16, fp16, fp32, or auto (what this device runs fast: ``precision``).
        trainable: prepare for training (LoRA trainable, checkpointing, train mode); otherwise the
            whole model is frozen and in eval mode.
        lora_dtype: dtype of A and B when training (auto: the compute dtype, fp32 under fp16), also for a loaded ``adapter`` (PEFT saves fp32 by
            default; in bf16 it trains on the fused 4-bit path like a fresh adapter). For inference a
            loaded adapter keeps the file's dtype, so eval/generate/merge see its exact values.
        seed: seeds the LoRA initialisation so a run is reproducible.
    """
    compute_dtype = resolve_compute_dtype(compute_dtype)
    lora_dtype = lora_dtype_for(lora_dtype, compute_dtype)
    model = load_base_model(
        model_path, bits=bits, quant_type=quant_type, double_quant=double_quant,
        compute_dtype=DTYPES[compute_dtype], trust_remote_code=trust_remote_code,
        allow_bin_weights=allow_bin_weights,
    )
    if adapter:
        # Training casts A and B to lora_dtype (the fused 4-bit path needs them in the compute dtype);
        # inference keeps the file's values exactly.
        load_adapter(model, adapter, trainable=trainable, dtype=DTYPES[lora_dtype] if trainable else None)
    elif trainable:
        if seed is not None:
            torch.manual_seed(seed)
        inject_lora(model, target_modules, rank, alpha, dropout, rslora, DTYPES[lora_dtype])
    if trainable:
        prepare_for_training(model, gradient_checkpointing, checkpoint_policy)
    else:
        model.eval()
    return model


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


def checkpoint_policy_for(config) -> str:
    """``config.train.checkpoint_policy``, with ``auto`` decided from the memory estimate of this run
    and the memory free now (``memory.choose_checkpoint_policy``)."""
    if config.train.checkpoint_policy != "auto":
        return config.train.checkpoint_policy
    from .memory import EstimateError, available_memory, choose_checkpoint_policy, estimate_settings
    from .quant import resolve_model_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = estimate_settings(config, device)
    del settings["checkpoint_policy"]
    try:
        policy, estimate = choose_checkpoint_policy(resolve_model_dir(config.model.model), available_memory(device),
                                                    **settings)
    except EstimateError as e:  # a config the estimator cannot read: the safe middle
        log.info("checkpoint policy auto -> balanced (no estimate: %s)", e)
        return "balanced"
    if estimate is not None:
        log.info("checkpoint policy auto -> %s (estimated peak %.2f GiB%s)", policy, estimate.total / 1024**3,
                 f"; checkpointing would save under {CHECKPOINTING_WORTH:.0%} of it" if policy == NO_CHECKPOINTING else "")
    return policy


def build_model_from_config(config, trainable: bool = True) -> nn.Module:
    """``build_model`` with the values of a ``config.Config`` (only entry points read config objects)."""
    m, lo = config.model, config.lora
    return build_model(
        m.model, bits=m.bits, quant_type=m.quant_type, double_quant=m.double_quant,
        compute_dtype=m.compute_dtype, trust_remote_code=m.trust_remote_code,
        allow_bin_weights=m.allow_bin_weights, adapter=lo.adapter, target_modules=lo.target_modules,
        rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, rslora=lo.rslora, lora_dtype=lo.lora_dtype,
        trainable=trainable, gradient_checkpointing=config.train.gradient_checkpointing,
        checkpoint_policy=checkpoint_policy_for(config) if trainable else "balanced", seed=config.train.seed,
    )
