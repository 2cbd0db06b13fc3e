"""Build the model a command works with: quantized frozen base + LoRA (fresh or loaded) + training prep."""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from qlora_lite.config import LoraConfig, ModelConfig, TrainConfig
from qlora_lite.kernels.checkpoint_policy import selective_checkpoint_context
from qlora_lite.kernels.cpu_attention import use_cpu_attention
from qlora_lite.kernels.footprint import NO_CHECKPOINTING
from qlora_lite.model.adapter import load_adapter
from qlora_lite.model.loading import DTYPES, load_base_model
from qlora_lite.model.lora import inject_lora
from qlora_lite.model.precision import lora_dtype_for, resolve_compute_dtype

log = logging.getLogger(__name__)


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True,
                         checkpoint_policy: str = "balanced") -> nn.Module:
    """Make a frozen (quantized) base trainable through its adapters.

    Non-reentrant checkpointing recomputes each decoder block in the backward pass; unlike the
    reentrant kind it needs no input that requires grad, so a frozen embedding works. The KV cache is
    useless while training and would hold memory, so it is switched off.

    Args:
        checkpoint_policy: memory (recompute whole blocks), balanced or speed (keep more outputs; see
            ``kernels.checkpoint_policy.selective_checkpoint_context``); ``kernels.checkpoint_policy.NO_CHECKPOINTING`` switches it off.
    """
    gradient_checkpointing = gradient_checkpointing and checkpoint_policy != NO_CHECKPOINTING
    model.config.use_cache = False
    model.qlora_checkpoint_policy = checkpoint_policy if gradient_checkpointing else None
    use_cpu_attention(model)  # CPU + SDPA only: blocked matmuls, faster than the fused kernel there (BENCHMARKS.md)
    # Beyond "memory", the policy keeps some block outputs instead of recomputing them
    # (kernels.checkpoint_policy.selective_checkpoint_context).
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
    bits: int = ModelConfig.bits,
    quant_type: str = ModelConfig.quant_type,
    double_quant: bool = ModelConfig.double_quant,
    compute_dtype: str = ModelConfig.compute_dtype,
    trust_remote_code: bool = False,
    allow_bin_weights: bool = False,
    adapter: str | None = None,
    target_modules: str = LoraConfig.target_modules,
    rank: int = LoraConfig.rank,
    alpha: float = LoraConfig.alpha,
    dropout: float = LoraConfig.dropout,
    rslora: bool = LoraConfig.rslora,
    dora: bool = LoraConfig.dora,
    lora_dtype: str = LoraConfig.lora_dtype,
    trainable: bool = True,
    gradient_checkpointing: bool = TrainConfig.gradient_checkpointing,
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
        load_adapter(model, adapter, trainable=trainable, dtype=DTYPES[lora_dtype] if trainable else None,
                     dropout=dropout if trainable else None)  # training on: this run's --dropout applies
    elif trainable:
        if seed is not None:
            torch.manual_seed(seed)
        inject_lora(model, target_modules, rank, alpha, dropout, rslora, DTYPES[lora_dtype], dora)
    if trainable:
        prepare_for_training(model, gradient_checkpointing, checkpoint_policy)
    else:
        model.eval()
    return model
