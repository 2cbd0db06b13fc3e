"""Preference losses (DPO, IPO, ORPO) on sequence log-probabilities, and their evaluation.

A batch of B pairs goes through the model as one (2B, T) batch, chosen rows first, then rejected
(``collate_pairs``). The formulas follow TRL (``trl/trainer/dpo_trainer.py``, ``_compute_loss``;
``trl/experimental/orpo/orpo_trainer.py``, ``odds_ratio_loss``) and keep its parameter names.
The DPO reference is the same model with the adapters switched off (``model.lora.adapters_disabled``),
or log-probabilities computed once before training and carried by the pairs (``ref_logps``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qlora_lite.data.packing import collate
from qlora_lite.kernels.chunked_loss import causal_lm_loss
from qlora_lite.kernels.footprint import IGNORE_INDEX
from qlora_lite.model.lora import adapters_disabled, lora_dropout_off


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``data.preference`` pairs -> one padded batch of 2B rows: the chosen sides, then the rejected."""
    rows = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
            for side in ("chosen", "rejected") for p in pairs]
    return collate(rows, pad_token_id)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens and their count.

    Returns:
        ``(logps, n_tokens)``: (R,) fp32 with grad, (R,) fp32.
    """
    token_loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                reduction="none")  # (R, T-1), 0 outside the labels
    n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).to(token_loss.device, torch.float32)
    return -token_loss.sum(dim=1), n_tokens


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor], adapters: bool = False) -> torch.Tensor:
    """(R,) summed log-probabilities under the reference: the base alone (adapters off), or with
    ``adapters`` the model as it is (a frozen start adapter), without LoRA dropout."""
    switch = contextlib.nullcontext() if adapters else adapters_disabled(model)
    with switch, lora_dropout_off(model):
        return sequence_logps(model, batch)[0]


@dataclass(frozen=True)
class PreferenceLoss:
    """The objective of ``--method dpo|orpo`` with TRL's parameter names.

    Attributes:
        method: "dpo" or "orpo".
        beta: DPO's beta (IPO's tau).
        loss_type: DPO loss, "sigmoid" or "ipo".
        label_smoothing: conservative DPO's flip probability (sigmoid only).
        orpo_lambda: weight of ORPO's odds-ratio term (TRL's ORPOConfig.beta).
    """

    method: str
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    orpo_lambda: float = 0.1

    @property
    def needs_reference(self) -> bool:
        return self.method == "dpo"

    def pair_terms(self, logps: torch.Tensor, n_tokens: torch.Tensor, ref: torch.Tensor | None) -> dict:
        """Per-pair losses and rewards from the (2B,) log-probs of a ``collate_pairs`` batch.

        Returns:
            ``{"losses": (B,), "nll_sum": scalar (ORPO's summed chosen NLL, else 0), "chosen_rewards",
            "rejected_rewards": (B,) detached}``. The objective of a batch is
            ``losses.mean() + nll_sum / chosen tokens``.
        """
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = n_tokens.chunk(2)
        if self.method == "orpo":
            return self._orpo(chosen, rejected, n_chosen.clamp(min=1), n_rejected.clamp(min=1))
        ref_chosen, ref_rejected = ref.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if self.loss_type == "ipo":  # on per-token means, as TRL does (confirmed with the IPO authors)
            delta = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
            losses = (delta - 1 / (2 * self.beta)) ** 2
        else:  # sigmoid; label smoothing as conservative DPO (Mitchell 2023; TRL before 1.0)
            logits = self.beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - self.label_smoothing) * F.logsigmoid(logits) - self.label_smoothing * F.logsigmoid(-logits)
        return {"losses": losses, "nll_sum": torch.zeros((), device=losses.device),
                "chosen_rewards": self.beta * chosen_ratio.detach(),
                "rejected_rewards": self.beta * rejected_ratio.detach()}

    def _orpo(self, chosen, rejected, n_chosen, n_rejected) -> dict:
        """ORPO (Hong et al. 2024, eqs. 4 and 7): mean per-token log-probs in the odds ratio, plus the NLL
        of the chosen responses (prompt masked, as our SFT loss; TRL's ORPOTrainer also counts the prompt)."""
        mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
        log_odds = (mean_chosen - mean_rejected) - (_log1mexp(mean_chosen) - _log1mexp(mean_rejected))
        losses = -self.orpo_lambda * F.logsigmoid(log_odds)
        return {"losses": losses, "nll_sum": -chosen.sum(),
                "chosen_rewards": self.orpo_lambda * mean_chosen.detach(),
                "rejected_rewards": self.orpo_lambda * mean_rejected.detach()}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable at both ends (Maechler 2012, as TRL's log1mexp)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_statistics(terms: dict) -> torch.Tensor:
    """Sums over the pairs of a batch, for metrics: [loss, chosen reward, rejected reward, correct, pairs]."""
    chosen, rejected = terms["chosen_rewards"], terms["rejected_rewards"]
    return torch.stack([terms["losses"].detach().sum(), chosen.sum(), rejected.sum(),
                        (chosen > rejected).float().sum(), torch.tensor(float(chosen.numel()), device=chosen.device)])


def metrics_from_sums(sums: torch.Tensor, nll_sum: float = 0.0, chosen_tokens: float = 1.0,
                      prefix: str = "") -> dict[str, float]:
    """Mean metrics from summed ``pair_statistics`` (over batches and processes); TRL's metric names."""
    loss_sum, chosen, rejected, correct, pairs = (float(v) for v in sums)
    pairs = max(pairs, 1.0)
    return {f"{prefix}loss": loss_sum / pairs + nll_sum / max(chosen_tokens, 1.0),
            f"{prefix}rewards/chosen": chosen / pairs, f"{prefix}rewards/rejected": rejected / pairs,
            f"{prefix}rewards/margins": (chosen - rejected) / pairs, f"{prefix}rewards/accuracies": correct / pairs}


def chosen_tokens(pairs: list[dict]) -> int:
    """Response tokens of the chosen sides that count in the loss (ORPO's NLL normalizer)."""
    return sum(1 for p in pairs for t in p["chosen_labels"][1:] if t != IGNORE_INDEX)


@torch.no_grad()
def preference_eval(model: nn.Module, pairs: list[dict], objective: PreferenceLoss, batch_size: int,
                    pad_token_id: int, device: torch.device | str = "cpu",
                    counted: int | None = None) -> tuple[torch.Tensor, float, int]:
    """Summed ``pair_statistics``, ORPO's NLL sum and the chosen token count over ``pairs`` (eval mode
    for the policy; the reference is the adapters-off base or the pairs' ``ref_logps``).

    Args:
        counted: only the first ``counted`` pairs count (the rest only run through the model: fillers
            that give every process of a multi-process run the same number of forward passes).

    Returns:
        ``(sums (5,) float64, nll_sum, chosen_tokens)``.
    """
    counted = len(pairs) if counted is None else counted
    was_training = model.training
    model.eval()
    sums, nll = torch.zeros(5, dtype=torch.float64), 0.0
    try:
        for start in range(0, len(pairs), batch_size):
            part = pairs[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(part, pad_token_id).items()}
            logps, n_tokens = sequence_logps(model, batch)
            ref = pair_reference(model, batch, part, objective)
            keep = max(0, min(len(part), counted - start))
            if keep < len(part):  # score only the counted rows of both sides
                rows = torch.cat([torch.arange(keep), len(part) + torch.arange(keep)]).to(logps.device)
                logps, n_tokens = logps[rows], n_tokens[rows]
                ref = None if ref is None else ref[rows]
            if keep:
                terms = objective.pair_terms(logps, n_tokens, ref)
                sums += pair_statistics(terms).double().cpu()
                nll += float(terms["nll_sum"])
    finally:
        model.train(was_training)
    return sums, nll, chosen_tokens(pairs[:counted])


def pair_reference(model: nn.Module, batch: dict, pairs: list[dict], objective: PreferenceLoss) -> torch.Tensor | None:
    """The (2B,) reference log-probs of a batch: precomputed ones carried by the pairs (``ref_logps``:
    [chosen, rejected]), else the adapters-off forward; None when the objective needs none."""
    if not objective.needs_reference:
        return None
    if all("ref_logps" in p for p in pairs):
        values = [p["ref_logps"][0] for p in pairs] + [p["ref_logps"][1] for p in pairs]
        return torch.tensor(values, dtype=torch.float32, device=batch["input_ids"].device)
    return reference_logps(model, batch)
