"""Our LoRA layers: ``y = base(x) + scaling * B(A(dropout(x)))`` around a frozen linear layer.

With DoRA (weight-decomposed LoRA, Liu et al. 2024) the layer also learns a magnitude per output
channel, ``lora_magnitude_vector`` = m: the effective weight is ``m * (W + s*B@A) / ||W + s*B@A||``
(row norms). The norm is recomputed from the dequantized base at every forward and treated as a
constant in the backward pass, as the paper and PEFT do, so no second copy of the base is ever kept.

Everything trainable is named ``lora_*`` so freezing, saving and stripping are one name filter each;
the wrapped layer is ``base_layer`` (the PEFT convention, so state-dict keys map one to one).
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_lite.config import LoraConfig
from qlora_lite.errors import LoRATargetError
from qlora_lite.flag_values import select_targets
from qlora_lite.kernels.lora_4bit import fast_lora_applies, lora_4bit_forward
from qlora_lite.model.bnb import dequantize_weight, is_linear_like, linear_shape
from qlora_lite.model.loading import release_freed_memory


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """The factor applied to ``B @ A``: alpha/r, or alpha/sqrt(r) for rank-stabilized LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def merge_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W + scaling * B @ A`` in fp32, each output row rescaled to ``magnitude`` for DoRA: the one merge
    used in memory, by the export and in tests.

    Args:
        weight: (out, in) base weight, or (in, out) when ``fan_in_fan_out`` (GPT-2's Conv1D layout).
        lora_A: (r, in).
        lora_B: (out, r).
        magnitude: (out,) DoRA magnitudes, or None for plain LoRA.

    Returns:
        fp32 tensor in the same layout as ``weight``.
    """
    merged = weight.float().clone() if weight.dtype == torch.float32 else weight.float()  # never the caller's
    # one fused pass over the (out, in) result: W + scaling * (B @ A) without a separate delta matrix
    (merged.t() if fan_in_fan_out else merged).addmm_(lora_B.float(), lora_A.float(), alpha=scaling)
    if magnitude is None:
        return merged
    rows = merged.t() if fan_in_fan_out else merged  # (out, in) view
    rows.mul_((magnitude.float() / torch.linalg.norm(rows, dim=1)).unsqueeze(1))
    return merged


class LoRALinear(nn.Module):
    """A frozen linear-like layer plus a trainable low-rank update.

    Wraps nn.Linear, transformers' Conv1D, bitsandbytes Linear4bit and Linear8bitLt.

    Args:
        base_layer: the frozen layer; left untouched (its bytes never change).
        rank, alpha, dropout, rslora: the LoRA hyper-parameters.
        lora_dtype: dtype of A and B (bf16 by default).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        lora_dtype: torch.dtype = torch.bfloat16,
        use_dora: bool = False,
    ):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = linear_shape(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, dtype=lora_dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, dtype=lora_dtype)
        self.merged_weight: torch.Tensor | None = None
        self.use_dora = use_dora
        self.adapter_enabled = True  # False: the layer is its base layer alone (``adapters_disabled``)
        self.reset_lora_parameters()
        if use_dora:  # B is zero: the magnitudes start as the base's row norms, so step 0 is the base
            with torch.no_grad():
                square = dequantize_weight(base_layer).square().sum(dim=1)  # (out,) fp32: ||W_i||^2
            # the frozen base's part of every later norm, kept so no forward needs the whole weight again
            self.register_buffer("base_row_square", square, persistent=False)
            # fp32 whatever lora_dtype is: a bf16 magnitude would make m / ||W|| differ from 1 at step 0
            self.lora_magnitude_vector = nn.Parameter(square.sqrt())

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform, B zero: the first forward equals the base layer's exactly."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` as fp32 (out, in)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base_layer(x)
        if self.merged:
            bias = getattr(self.base_layer, "bias", None)
            return nn.functional.linear(x.to(self.merged_weight.dtype), self.merged_weight, bias)
        if fast_lora_applies(self, x):  # training over a 4-bit base: one fused autograd function
            fused = lora_4bit_forward(self, x)
            return self._dora_rescale(fused) if self.use_dora else fused
        result = self.base_layer(x)
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        update = self.lora_B(self.lora_A(lora_x)) * self.scaling
        if self.use_dora:
            return result + self._dora_term(result, lora_x, update).to(result.dtype)
        return result + update.to(result.dtype)

    @torch.no_grad()
    def _dora_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """Row norms of ``W + s*B@A`` (out,), fp32, without building the (out, in) matrix:
        ``||W_i||^2 + 2s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T``. ``W A^T`` is the base layer applied to
        the r rows of A (in ``dtype``, what the layer computes in); the rest is (r, r)-sized."""
        a, b = self.lora_A.weight, self.lora_B.weight.float()  # (r, in), (out, r)
        wa = self.base_layer(a.to(dtype)).float()  # (r, out) = A @ W^T (+ bias)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            wa = wa - bias.float()
        cross = (wa.t() * b).sum(dim=1)
        quad = ((b @ (a.float() @ a.float().t())) * b).sum(dim=1)
        s = self.scaling
        return (self.base_row_square + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def _dora_rescale(self, fused: torch.Tensor) -> torch.Tensor:
        """DoRA without dropout from the fused ``W x + b + s*B A x``: ``(m/n) * (fused - b) + b``."""
        # in the compute dtype, as PEFT does: an fp32 copy of every output would be kept for the backward
        scale = (self.lora_magnitude_vector.float() / self._dora_norm(fused.dtype)).to(fused.dtype)
        bias = getattr(self.base_layer, "bias", None)
        return fused * scale if bias is None else (fused - bias) * scale + bias

    def _dora_term(self, result: torch.Tensor, lora_x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to ``base(x)``: ``(m/n - 1) * W x + (m/n) * s*B A x``, n the row norms of
        ``W + s*B@A`` (no gradient). With dropout active the ``W x`` part sees the dropped input, as in PEFT.

        Shapes: result (..., out), lora_x (..., in), update (..., out).
        """
        scale = self.lora_magnitude_vector.float() / self._dora_norm(result.dtype)  # (out,): m gets its gradient here
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = result
        else:
            base = self.base_layer(lora_x.to(result.dtype))
        base = base if bias is None else base - bias
        return (scale - 1) * base.float() + scale * update.float()

    def merge(self) -> None:
        """Use ``dequantize(W) + scaling * B @ A`` as the weight; the base layer is kept for unmerge."""
        if self.merged:
            return
        weight = merge_weight(dequantize_weight(self.base_layer), self.lora_A.weight, self.lora_B.weight, self.scaling,
                              magnitude=self.lora_magnitude_vector if self.use_dora else None)
        bias = getattr(self.base_layer, "bias", None)
        dtype = bias.dtype if bias is not None else self.lora_A.weight.dtype
        self.merged_weight = weight.to(dtype)

    def unmerge(self) -> None:
        """Back to base + adapter; the base layer was never modified, so this is exact."""
        self.merged_weight = None

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, dora={self.use_dora}, "
                f"merged={self.merged}")


def find_target_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the linear layers to wrap, in model order.

    Args:
        target_modules: module-name suffixes, a regex as PEFT stores one (full match), or "all-linear"
            (every linear layer except the output head).

    Raises:
        LoRATargetError: nothing matched; the message lists the linear layer names the model has.
    """
    head = model.get_output_embeddings()
    candidates = [n for n, m in model.named_modules() if is_linear_like(m) and m is not head and "lora_" not in n]
    chosen, unmatched = select_targets(candidates, target_modules)
    # One typo in a list (q_proj,v_prj) would otherwise train the others and silently skip it.
    if chosen and unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        hints = [f"{t!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(t, suffixes, 1))
                             else "") for t in unmatched]
        raise LoRATargetError(
            f"--target-modules: {', '.join(hints)} match(es) no linear layer of {type(model).__name__}; its "
            f"linear layers are named: {', '.join(suffixes)} (fix or drop the name, or use all-linear)")
    if not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise LoRATargetError(
            f"target modules {target_modules!r} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(suffixes)} (or use all-linear)"
        )
    return chosen


def inject_lora(
    model: nn.Module,
    target_modules: str | list[str] = LoraConfig.target_modules,
    rank: int = LoraConfig.rank,
    alpha: float = LoraConfig.alpha,
    dropout: float = LoraConfig.dropout,
    rslora: bool = LoraConfig.rslora,
    lora_dtype: torch.dtype = torch.bfloat16,
    use_dora: bool = LoraConfig.dora,
) -> list[str]:
    """Replace each target layer with a LoRALinear around it, in place; freeze everything else.

    Returns:
        The names of the wrapped layers.
    """
    names = find_target_modules(model, target_modules)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, rank, alpha, dropout, rslora, lora_dtype, use_dora))
        if use_dora:  # the layer dequantized its base once for its norms: give that heap back at once
            release_freed_memory()
    mark_only_lora_trainable(model)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def set_merged(model: nn.Module, merged: bool) -> None:
    """Merge or unmerge every LoRA layer in place."""
    for layer in lora_layers(model).values():
        layer.merge() if merged else layer.unmerge()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, every LoRA layer computes its frozen base layer alone: the model is the base.

    Preference tuning's reference policy is this: the base is frozen, so switching the adapters off
    gives the reference without a second copy of the model. Nothing is copied or modified.
    """
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_enabled = True


@contextlib.contextmanager
def lora_dropout_off(model: nn.Module) -> Iterator[None]:
    """Within the block, LoRA dropout is off while every other module keeps its train/eval mode.

    A frozen adapter used as a reference is scored without dropout, and the rest of the model stays
    in training mode: bitsandbytes repacks 4-bit weights into a CPU inference layout in eval mode.
    """
    dropouts = [layer.lora_dropout for layer in lora_layers(model).values()]
    modes = [d.training for d in dropouts]
    for d in dropouts:
        d.eval()
    try:
        yield
    finally:
        for d, mode in zip(dropouts, modes):
            d.train(mode)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain 16-bit layer holding the merged weight; returns the model.

    Quantized bases become dense ``nn.Linear`` (the merged weight is no longer on the 4-bit grid);
    Conv1D stays Conv1D so the state-dict layout matches the original architecture.
    """
    conv1d = Conv1D
    for name, layer in lora_layers(model).items():
        layer.merge()
        base, weight = layer.base_layer, layer.merged_weight
        bias = getattr(base, "bias", None)
        if isinstance(base, conv1d):
            plain = conv1d(layer.out_features, layer.in_features)
            plain.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
            plain.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            plain.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model
