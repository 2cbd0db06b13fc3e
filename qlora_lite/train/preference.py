"""The training side of ``--method dpo|orpo``: the objective from the config, the loss of one
micro-batch of pairs, and the reference log-probs of a run that starts from an SFT adapter.

Reference policy: with a fresh adapter it is the base, i.e. the model with its adapters switched off,
computed in each step under no_grad (no second copy of the model, nothing to store: a resumed run
gets the same values from the same frozen base). Starting from ``--adapter``, the reference is that
adapter frozen as it was loaded: its log-probs are computed once per pair before the first step and
written to ``reference_logps.safetensors`` in the run folder, which a resumed run reads back (or
recomputes, from the start adapter it loads before the checkpoint, when the file is missing).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qlora_lite.config import Config
from qlora_lite.model.preference import (
    PreferenceLoss,
    collate_pairs,
    pair_reference,
    pair_statistics,
    reference_logps,
    sequence_logps,
)
from qlora_lite.storage.durable import load_tensors, save_safetensors_atomic

log = logging.getLogger(__name__)
REFERENCE_NAME = "reference_logps.safetensors"
N_SUMS = 6  # pair_statistics (5) + ORPO's chosen NLL sum


def objective_for(config: Config) -> PreferenceLoss | None:
    """The preference objective of ``--method`` (None for sft)."""
    t = config.train
    if t.method == "sft":
        return None
    return PreferenceLoss(t.method, beta=t.beta, loss_type=t.dpo_loss, label_smoothing=t.label_smoothing,
                          orpo_lambda=t.orpo_lambda)


def micro_batch_loss(model, pairs: list[dict], objective: PreferenceLoss, pad_token_id: int, device,
                     n_pairs: int, n_chosen_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one micro-batch, normalized by the whole window (all processes), and its sums.

    Chosen and rejected go through the model as one (2B, T) batch. The loss is
    ``sum(pair losses) / n_pairs + ORPO's chosen NLL / n_chosen_tokens``, so gradient accumulation and
    several processes give the update of one large batch, as for SFT.

    Returns:
        ``(loss with grad, sums (N_SUMS,) detached)``.
    """
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_token_id).items()}
    logps, n_tokens = sequence_logps(model, batch)
    terms = objective.pair_terms(logps, n_tokens, pair_reference(model, batch, pairs, objective))
    loss = terms["losses"].sum() / max(1, n_pairs) + terms["nll_sum"] / max(1, n_chosen_tokens)
    sums = torch.cat([pair_statistics(terms), terms["nll_sum"].detach().reshape(1)])
    return loss, sums


def attach_start_reference(model, accelerator, output_dir: Path, splits: dict[str, list[dict]], batch_size: int,
                           pad_token_id: int, resume: bool) -> dict[str, torch.Tensor] | None:
    """Give every pair its ``ref_logps`` [chosen, rejected] under the start adapter (call before the
    checkpoint's weights are loaded). Read from the run folder on resume when the file is there.

    Each process scores its share of the pairs; the sums over processes give every process all of them.

    Returns:
        The computed values ({split: (N, 2)}) for ``write_reference`` once the run folder exists;
        None when they were read from it.
    """
    path = output_dir / REFERENCE_NAME
    counts = {name: len(pairs) for name, pairs in splits.items()}
    if resume and path.is_file():
        tensors = load_tensors(path)
        if {name: tensors[name].shape[0] for name in tensors} == {n: c for n, c in counts.items() if c}:
            for name, pairs in splits.items():
                for pair, values in zip(pairs, tensors.get(name, torch.zeros(0, 2)).tolist()):
                    pair["ref_logps"] = values
            log.info("reference log-probs of the start adapter read from %s", path)
            return None
        log.warning("%s does not match the data; computing the reference log-probs again", path)
    rank, procs = accelerator.process_index, accelerator.num_processes
    device = next(p for p in model.parameters()).device
    computed = {}
    for name, pairs in splits.items():
        values = torch.zeros(len(pairs), 2, dtype=torch.float64, device=accelerator.device)
        mine = list(range(rank, len(pairs), procs))
        for start in range(0, len(mine), batch_size):
            index = mine[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in index], pad_token_id).items()}
            ref = reference_logps(model, batch, adapters=True).double().view(2, -1).t()  # (B, 2)
            values[index] = ref.to(values.device)
        if procs > 1:
            values = accelerator.reduce(values, "sum")
        for pair, row in zip(pairs, values.tolist()):
            pair["ref_logps"] = row
        computed[name] = values.float()
    log.info("reference log-probs of the start adapter computed for %s pairs",
             " + ".join(str(c) for c in counts.values()))
    return {name: t for name, t in computed.items() if t.shape[0]}


def write_reference(output_dir: Path, tensors: dict[str, torch.Tensor] | None) -> None:
    """Write ``attach_start_reference``'s values (if any) into the run folder."""
    if tensors:
        save_safetensors_atomic(tensors, output_dir / REFERENCE_NAME, metadata={"what": "reference log-probs "
                                "[chosen, rejected] per pair under the start adapter"})
