"""The merge check: every merged tensor against an exact reconstruction, then one probe forward.

1. Weights. Each stored tensor is compared with ``W + scale * B @ A`` computed in fp64 from the
   base, independently of the merge arithmetic (``model.lora.merge_weight``): ``W`` is the weight training
   multiplied by (quantized, then dequantized to the compute dtype along the training forward's own
   path) or, for ``original``, the checkpoint's. A correct merge differs from that exact value only
   by rounding to the output dtype (at most half a unit in its last place) plus the fp32 arithmetic of
   the merge, so the bound follows from the dtypes and a wrong value fails however small the model's
   tolerance for noise is. Tensors without an adapter must be bit-identical to what the plan says
   (the base's value, in the output dtype). Comparing forwards instead could not tell a correct merge
   of a model that amplifies bf16 rounding from a wrong one.
2. Probe. The merged folder runs forward on a probe input, and so does the base's model definition
   (its config.json) holding the values step 1 accepted, both in fp32 on the CPU (never
   bf16: CPUs without bf16 kernels run it orders of magnitude slower) and streamed one decoder block
   at a time (``merge.stream_forward.streamed_logits``). The same values in fp32 give the same logits, so
   the bound is tight, and what fails is a folder that does not load as the model it should be
   (config.json). The reference holds the stored values, not the reconstruction: a value the merge's
   fp32 arithmetic rounded to the other neighbour is within step 1's bound yet could move the logits
   of a model that amplifies small changes.

Both steps hold a few tensors (the reconstruction in row chunks) or one decoder block, never a model.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from qlora_lite.merge.plan import MergePlan, as_trained_weight
from qlora_lite.merge.stream_forward import streamed_logits
from qlora_lite.model.folder import weight_files
from qlora_lite.model.loading import DTYPES, release_freed_memory
from qlora_lite.storage.safetensors_io import iter_tensors, read_headers, read_rows

# Mantissa bits stored by each output dtype: round-to-nearest errs by at most 2**-(bits+1) relative.
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


# The merge's own fp32 arithmetic: each product and sum of W + s * (B @ A) rounds once in fp32
# (unit roundoff 2**-24), so its error is at most (rank + 2) units times the sum of the magnitudes.
FP32_UNIT_ROUNDOFF = 2.0 ** -24


# Probe: largest |logit difference| relative to max |reference logit|. Both sides hold the same
# values in fp32, so anything above fp32 reproducibility is a layout mistake, not noise.
PROBE_TOLERANCE = 1e-4


# Elements of a tensor compared at once (in fp64), so the check never holds a large matrix.
_CHUNK_ELEMENTS = 1 << 18


@dataclass
class MergeCheck:
    """What ``verify_merge`` found. ``problem`` is None when the merge passed."""

    tensors: int  # tensors compared
    worst_tensor: str | None  # the merged tensor closest to (or furthest past) its bound
    worst_ratio: float  # max |stored - exact| / bound over that tensor; <= 1 passes
    logit_diff: float | None  # probe, None when the weight check already failed
    logit_tolerance: float | None
    problem: str | None = None


def probe_ids(vocab_size: int, length: int = 32) -> torch.Tensor:
    """A fixed pseudo-random token sequence, (1, length): exercises every layer, needs no tokenizer."""
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def as_trained(plan: MergePlan, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A base tensor as the 4-bit training model multiplied by it: quantized, dequantized to the compute dtype."""
    return as_trained_weight(tensor, key in plan.conv1d, plan.quant, as_computed=True) if key in plan.quantized else tensor


def _merge_base(plan: MergePlan, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The weight the adapter adds to, as training held it (8-bit: the int8 codes times their scales)."""
    if key in plan.quantized:
        return as_trained(plan, key, tensor) if plan.quant["bits"] == 4 else as_trained_weight(
            tensor, key in plan.conv1d, plan.quant)
    if plan.quant.get("compute_dtype") is not None and tensor.is_floating_point():
        return tensor.to(plan.quant["compute_dtype"])  # the dequantized policy: as training held it
    return tensor


def _half_ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of ``dtype`` at each value of ``exact`` (fp64), subnormals included."""
    bits, info = MANTISSA_BITS[dtype], torch.finfo(dtype)
    _, exponent = torch.frexp(exact)  # exact = m * 2**exponent, 0.5 <= |m| < 1
    smallest = info.smallest_normal * 2.0 ** -bits  # the spacing of subnormals
    return torch.clamp(torch.ldexp(torch.ones_like(exact), exponent - 1 - bits), min=smallest) / 2


def _chunk_ratio(plan: MergePlan, key: str, start: int, base: torch.Tensor, stored: torch.Tensor,
                 out: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|stored - exact| / bound, |stored - exact|)`` for rows ``start:`` of one weight, in fp64
    (the ratio is inf where the stored value is not finite).

    Args:
        base, stored: the same rows of the merge base and of the merged tensor, in the stored layout:
            (out, in), or (in, out) for GPT-2's Conv1D.
    """
    w = base.double()
    exact, magnitude, rank = w, w.abs(), 0
    if key in plan.lora:
        lora_A, lora_B, scaling = plan.lora[key]
        a, b = lora_A.double(), lora_B.double()  # (r, in), (out, r)
        rows = slice(start, start + w.shape[0])
        if key in plan.conv1d:  # stored rows are inputs: delta^T[rows] = (B @ A[:, rows])^T
            delta, size = (b @ a[:, rows]).t(), (b.abs() @ a[:, rows].abs()).t()
        else:
            delta, size = b[rows] @ a, b[rows].abs() @ a.abs()
        exact, magnitude, rank = w + scaling * delta, magnitude + abs(scaling) * size, a.shape[0]
    bound = _half_ulp(exact, out) + (rank + 2) * FP32_UNIT_ROUNDOFF * magnitude
    error = (stored.double() - exact).abs()
    return torch.where(torch.isfinite(error), error / bound, torch.full_like(error, float("inf"))), error


def _check_tensor(plan: MergePlan, entry, stored_entry, out: torch.dtype, dtype: str) -> tuple[float, str | None]:
    """One merged tensor against its reconstruction, in row chunks (only a quantized weight is read
    whole: its quantization statistics span the tensor).

    Returns:
        ``(worst ratio to the bound, problem or None)``.
    """
    key, where = entry.name, f"tensor {entry.name} in {stored_entry.file.name}"
    exact_only = key not in plan.quantized and key not in plan.lora  # must be the base's, bit for bit
    whole = _merge_base(plan, key, next(iter_tensors([entry]))[1]) if key in plan.quantized else None
    shape = tuple(entry.shape) or (1,)
    row_elements = max(1, stored_entry.nbytes // stored_entry.dtype.itemsize // max(1, shape[0]))
    rows = max(1, _CHUNK_ELEMENTS // row_elements)
    worst = 0.0
    for start in range(0, max(1, shape[0]), rows):
        stored = read_rows(stored_entry, start, start + rows)
        base = whole[start:start + rows] if whole is not None else _merge_base(
            plan, key, read_rows(entry, start, start + rows))
        if exact_only:
            if not torch.equal(stored, base.to(out) if base.is_floating_point() else base):
                return float("inf"), (f"{where} has no adapter, so it must equal the base's value in {dtype} bit for "
                                      "bit, and it does not")
            continue
        ratio, error = _chunk_ratio(plan, key, start, base, stored, out)
        index = int(ratio.argmax())
        value = ratio.reshape(-1)[index].item()
        if not value <= 1.0:
            row, col = divmod(index, ratio.shape[-1]) if ratio.ndim == 2 else (index, 0)
            return value, (f"{where} differs from W + scale * B @ A (computed in fp64 from the base) by "
                           f"{error.reshape(-1)[index].item():.3g} at index {[start + row, col]}, {value:.3g} times "
                           f"the bound there (half a {dtype} unit in the last place plus the merge's fp32 rounding)")
        worst = max(worst, value)
    return worst, None


def check_weights(plan: MergePlan, merged_dir: Path, dtype: str) -> MergeCheck:
    """Compare every tensor of ``merged_dir`` with its reconstruction from the base, one at a time.

    Returns:
        MergeCheck without the probe; ``problem`` names the first tensor that fails and by how much.
    """
    out = DTYPES[dtype]
    merged = {e.name: e for e in read_headers(weight_files(merged_dir))}
    missing = [e.name for e in plan.entries if e.name not in merged]
    extra = sorted(set(merged) - {e.name for e in plan.entries})
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has tensors the base lacks: {', '.join(extra[:3])}"
        return MergeCheck(0, None, float("inf"), None, None, f"the merged folder {what}")
    checked, worst = 0, (None, 0.0)
    for entry in plan.entries:
        stored = merged[entry.name]
        expected_dtype = out if entry.dtype.is_floating_point else entry.dtype
        if tuple(stored.shape) != tuple(entry.shape) or stored.dtype != expected_dtype:
            return MergeCheck(checked, entry.name, float("inf"), None, None,
                              f"tensor {entry.name} in {stored.file.name} is {stored.dtype} {tuple(stored.shape)}, "
                              f"expected {expected_dtype} {tuple(entry.shape)}")
        ratio, problem = _check_tensor(plan, entry, stored, out, dtype)
        if problem is not None:
            return MergeCheck(checked, entry.name, ratio, None, None, problem)
        checked += 1
        if ratio >= worst[1]:
            worst = (entry.name, ratio)
        release_freed_memory()
    return MergeCheck(checked, worst[0], worst[1], None, None)


def _vocab_size(plan: MergePlan) -> int:
    return int(AutoConfig.from_pretrained(plan.base_dir).get_text_config().vocab_size)


def verify_merge(plan: MergePlan, merged_dir: Path, dtype: str, tolerance: float | None = None,
                 trust_remote_code: bool = False) -> MergeCheck:
    """Check the merged folder: every tensor against its exact reconstruction, then the probe forward.

    Args:
        tolerance: largest allowed |logit difference| of the probe (default ``PROBE_TOLERANCE``
            times the largest reference logit).

    Returns:
        MergeCheck; ``problem`` says what failed first (the probe runs only after the weights pass).
    """

    result = check_weights(plan, merged_dir, dtype)
    if result.problem is not None:
        return result
    ids = probe_ids(_vocab_size(plan))
    # fp32 on both sides: see the module docstring. The reference is the base's model definition.
    expected = streamed_logits(merged_dir, torch.float32, ids, trust_remote_code=trust_remote_code,
                               config_dir=plan.base_dir)
    gc.collect()
    release_freed_memory()
    got = streamed_logits(merged_dir, torch.float32, ids, trust_remote_code=trust_remote_code)
    gc.collect()
    diff = (got - expected).abs().max().item()
    diff = diff if diff == diff else float("inf")  # NaN counts as failure
    if tolerance is None:
        tolerance = PROBE_TOLERANCE * max(1e-3, expected.abs().max().item())
    result.logit_diff, result.logit_tolerance = diff, tolerance
    if not diff <= tolerance:
        result.problem = (f"every tensor matches, but the merged folder's probe logits deviate from the base model "
                          f"holding the same tensors by up to {diff:.4g} (tolerance {tolerance:.4g}): the folder "
                          f"does not load as the same model; compare {merged_dir / 'config.json'} with "
                          f"{plan.base_dir / 'config.json'}")
    return result
