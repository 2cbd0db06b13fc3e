"""The merge check: every merged tensor against an exact reconstruction, then one probe forward.

1. Weights. Each stored tensor is compared with ``W + scale * B @ A`` computed in fp64 from the
   base, independently of the merge arithmetic (``lora.merge_weight``): ``W`` is the weight training
   multiplied by (quantized, then dequantized to the compute dtype along the training forward's own
   path) or, for ``original``, the checkpoint's. A correct merge differs from that exact value only
   by rounding to the output dtype (at most half a unit in its last place) plus the fp32 arithmetic of
   the merge, so the bound follows from the dtypes and a wrong value fails however small the model's
   tolerance for noise is. Tensors without an adapter must be bit-identical to what the plan says
   (the base's value, in the output dtype). Comparing forwards instead could not tell a correct merge
   of a model that amplifies bf16 rounding from a wrong one.
2. Probe. The merged folder runs forward on a probe input, and so does the base's model definition
   (its config and key names) holding the values step 1 accepted, both in fp32 on the CPU (never
   bf16: CPUs without bf16 kernels run it orders of magnitude slower) and streamed one decoder block
   at a time (``stream_forward.streamed_logits``). The same values in fp32 give the same logits, so
   the bound is tight, and what fails is a folder that does not load as the model it should be
   (config.json, key names). The reference holds the stored values, not the reconstruction: a value
   the merge's fp32 arithmetic rounded to the other neighbour is within step 1's bound yet could move
   the logits of a model that amplifies small changes.

Both steps hold a few tensors (the reconstruction in row chunks) or one decoder block, never a model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .export import MergePlan, _roundtrip
from .quant import DTYPES, release_freed_memory, weight_files
from .safetensors_io import iter_tensors, read_headers

# Mantissa bits stored by each output dtype: round-to-nearest errs by at most 2**-(bits+1) relative.
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
# The merge's own fp32 arithmetic: each product and sum of W + s * (B @ A) rounds once in fp32
# (unit roundoff 2**-24), so its error is at most (rank + 2) units times the sum of the magnitudes.
FP32_UNIT_ROUNDOFF = 2.0 ** -24
# Probe: largest |logit difference| relative to max |reference logit|. Both sides hold the same
# values in fp32, so anything above fp32 reproducibility is a layout mistake, not noise.
PROBE_TOLERANCE = 1e-4
# Rows of a weight reconstructed at once in fp64, so the check never holds a large fp64 matrix.
_CHUNK_ELEMENTS = 1 << 20


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
    return _roundtrip(tensor, key in plan.conv1d, plan.quant, as_computed=True) if key in plan.quantized else tensor


def _merge_base(plan: MergePlan, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The weight the adapter adds to, as training held it (8-bit: the int8 codes times their scales)."""
    if key in plan.quantized:
        return as_trained(plan, key, tensor) if plan.quant["bits"] == 4 else _roundtrip(
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


def _compare_rows(plan: MergePlan, key: str, base: torch.Tensor, stored: torch.Tensor,
                  out: torch.dtype) -> tuple[float, float, tuple[int, ...]]:
    """Worst |stored - exact| / bound over one weight, chunk by chunk in fp64.

    Args:
        base: the merge base, (out, in) or (in, out) for Conv1D; stored: the merged tensor, same shape.

    Returns:
        ``(ratio, error, index)`` at the worst element; ratio > 1 fails (inf for a non-finite value).
    """
    conv1d = key in plan.conv1d
    if conv1d:  # work in (out, in): the adapter's layout
        base, stored = base.t(), stored.t()
    lora_A, lora_B, scaling = plan.lora.get(key, (None, None, 0.0))
    rows = max(1, _CHUNK_ELEMENTS // max(1, base.shape[-1]))
    worst = (-1.0, 0.0, (0, 0))
    for start in range(0, base.shape[0], rows):
        w = base[start:start + rows].double()
        exact, magnitude = w, w.abs()
        if lora_A is not None:
            b, a = lora_B[start:start + rows].double(), lora_A.double()
            exact = w + scaling * (b @ a)
            magnitude = magnitude + abs(scaling) * (b.abs() @ a.abs())
        rank = 0 if lora_A is None else lora_A.shape[0]
        bound = _half_ulp(exact, out) + (rank + 2) * FP32_UNIT_ROUNDOFF * magnitude
        error = (stored[start:start + rows].double() - exact).abs()
        ratio = torch.where(torch.isfinite(error), error / bound, torch.full_like(error, float("inf")))
        index = int(ratio.argmax())
        value = ratio.reshape(-1)[index].item()
        if value > worst[0]:
            row, col = divmod(index, ratio.shape[-1])
            worst = (value, error.reshape(-1)[index].item(), (col, start + row) if conv1d else (start + row, col))
    return worst


def _expected_exactly(plan: MergePlan, key: str, tensor: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """What the plan says an untouched tensor becomes: the base's value, cast once to ``out`` if float."""
    value = _merge_base(plan, key, tensor)
    return value.to(out) if value.is_floating_point() else value


def _stored(merged: dict, key: str, _base_tensor: torch.Tensor) -> torch.Tensor:
    """The merged folder's value for base key ``key`` (the probe reference's ``transform``)."""
    (_, tensor), = iter_tensors([merged[key]])
    return tensor


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
    for entry, tensor in iter_tensors(plan.entries):
        (_, stored), = iter_tensors([merged[entry.name]])
        where = f"tensor {entry.name} in {merged[entry.name].file.name}"
        if stored.shape != tensor.shape or (tensor.is_floating_point() and stored.dtype != out):
            return MergeCheck(checked, entry.name, float("inf"), None, None,
                              f"{where} is {stored.dtype} {tuple(stored.shape)}, expected "
                              f"{out if tensor.is_floating_point() else tensor.dtype} {tuple(tensor.shape)}")
        if entry.name in plan.quantized or entry.name in plan.lora:
            ratio, error, index = _compare_rows(plan, entry.name, _merge_base(plan, entry.name, tensor), stored, out)
            if not ratio <= 1.0:
                return MergeCheck(checked, entry.name, ratio, None, None,
                                  f"{where} differs from W + scale * B @ A (computed in fp64 from the base) by "
                                  f"{error:.3g} at index {list(index)}, {ratio:.3g} times the bound there (half a "
                                  f"{dtype} unit in the last place plus the merge's fp32 rounding)")
        else:
            ratio = 0.0
            if not torch.equal(stored, _expected_exactly(plan, entry.name, tensor, out)):
                return MergeCheck(checked, entry.name, float("inf"), None, None,
                                  f"{where} has no adapter, so it must equal the base's value in {dtype} bit for "
                                  "bit, and it does not")
        checked += 1
        if ratio >= worst[1]:
            worst = (entry.name, ratio)
        del tensor, stored
    release_freed_memory()
    return MergeCheck(checked, worst[0], worst[1], None, None)


def _vocab_size(plan: MergePlan) -> int:
    from transformers import AutoConfig

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
    import gc

    from .stream_forward import streamed_logits

    result = check_weights(plan, merged_dir, dtype)
    if result.problem is not None:
        return result
    ids = probe_ids(_vocab_size(plan))
    merged = {e.name: e for e in read_headers(weight_files(merged_dir))}
    # fp32 on both sides: see the module docstring. The reference is the base's model definition.
    expected = streamed_logits(plan.base_dir, torch.float32, ids, trust_remote_code=trust_remote_code,
                               transform=functools.partial(_stored, merged))
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
