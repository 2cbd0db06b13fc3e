"""The model a training run trains, built from its config: the checkpoint policy ``auto`` resolved here."""

from __future__ import annotations

import logging

import torch
from torch import nn

from qlora_lite.errors import EstimateError
from qlora_lite.kernels.footprint import NO_CHECKPOINTING
from qlora_lite.model.build import build_model
from qlora_lite.model.folder import resolve_model_dir
from qlora_lite.train.fit import (
    CHECKPOINTING_WORTH,
    available_memory,
    choose_checkpoint_policy,
    estimate_settings,
)

log = logging.getLogger(__name__)


def checkpoint_policy_for(config) -> str:
    """``config.train.checkpoint_policy``, with ``auto`` decided from the memory estimate of this run
    and the memory free now (``train.fit.choose_checkpoint_policy``)."""
    if config.train.checkpoint_policy != "auto":
        return config.train.checkpoint_policy

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
