"""How a training run is set up from its config: the dtypes it runs in, the model it trains (with the
checkpoint policy ``auto`` resolved), and the fingerprint a resume is checked against."""

from __future__ import annotations

import logging

import torch
from torch import nn

from qlora_lite.checkpoint.resume import make_fingerprint
from qlora_lite.config import Config
from qlora_lite.data.sources import source_sha256
from qlora_lite.errors import EstimateError
from qlora_lite.kernels.footprint import NO_CHECKPOINTING
from qlora_lite.model.build import build_model
from qlora_lite.model.folder import resolve_model_dir
from qlora_lite.model.precision import lora_dtype_for, resolve_compute_dtype
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
        rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, rslora=lo.rslora, dora=lo.dora, lora_dtype=lo.lora_dtype,
        trainable=trainable, gradient_checkpointing=config.train.gradient_checkpointing,
        checkpoint_policy=checkpoint_policy_for(config) if trainable else "balanced", seed=config.train.seed,
    )


def resolve_precision(config: Config, saved_state: dict | None = None) -> None:
    """Replace ``auto`` compute and LoRA dtypes in ``config`` by concrete ones (logged, and recorded in
    config.yaml and the run fingerprint as what ran).

    A resumed run keeps the dtypes it was trained in where the user left them on auto, so moving a run
    to a machine of another CPU class resumes the same run (a warning says when that is slow here).
    """
    m, lo = config.model, config.lora
    saved = (saved_state or {}).get("fingerprint", {})
    for section, name in ((m, "compute_dtype"), (lo, "lora_dtype")):
        if getattr(section, name) == "auto" and saved.get(name) not in (None, "auto"):
            setattr(section, name, saved[name])
            log.info("resume: %s %s, as the run was trained", name.replace("_", " "), saved[name])
    m.compute_dtype = resolve_compute_dtype(m.compute_dtype)
    lo.lora_dtype = lora_dtype_for(lo.lora_dtype, m.compute_dtype)


def run_fingerprint(config: Config, num_processes: int, **extra) -> dict:
    """What a resumed run is checked against (``checkpoint.check_resume_compatible``): settings and data hash
    (of the file, of every file of a folder, or of a hub dataset's cached revision)."""
    d = config.data
    digest = source_sha256(d.data, d.data_split, d.data_config)
    return make_fingerprint(config.to_dict(), digest, num_processes=num_processes, **extra)
