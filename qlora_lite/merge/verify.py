"""The merge check: every merged tensor against an exact reconstruction as it is written, the files
read back, then one probe forward.

1. Weights, in the merge's stream (``StreamCheck``). Each merged tensor, rounded to the output dtype
   as it is about to be written, is compared with ``W + scale * B @ A`` computed anew from the same
   merge base, independently of the merge arithmetic (``model.lora.merge_weight``): ``W`` is the
   weight training multiplied by (``merge.plan.merge_base_weight``: quantized, then dequantized to
   the compute dtype along the training forward's own path) or, for ``original``, the checkpoint's.
   A correct merge differs from the true value only by rounding to the output dtype (at most half a
   unit in its last place) plus the fp32 arithmetic of the merge, and the check's own fp32 value errs
   by as little, both bounded from the dtypes and the magnitudes (``_chunk_ratio``), so a wrong value
   fails however small the model's tolerance for noise is. Tensors without an
   adapter must be bit-identical to their merge base in the output dtype. Comparing forwards instead
   could not tell a correct merge of a model that amplifies bf16 rounding from a wrong one. The base
   is computed once for both: it is the training model's weight by construction (the same function
   builds the training model), so a second computation would verify nothing about the merge.
2. Files (``check_files``). The written folder holds exactly the planned tensors, names, dtypes and
   shapes, and each tensor's bytes read back from disk have the CRC-32 of the bytes step 1 checked.
3. Config. The merged config.json says what the base's does, but for its dtype and the
   quantization settings the merge removes (``config_changes``).
4. Probe. The merged folder runs forward on a probe input, and so does the base's model definition
   (its config.json) holding the values step 1 accepted, both in the dtype this CPU multiplies fast
   (bf16 only where it has bf16 kernels, else fp32: ``model.precision``) and streamed one decoder
   block at a time (``merge.stream_forward.streamed_logits``). The same values in the same dtype
   give the same logits, so the bound is tight, and what fails is a folder that does not load as
   the model it should be. The reference holds the stored values, not the reconstruction: a value the
   merge's fp32 arithmetic rounded to the other neighbour is within step 1's bound yet could move the
   logits of a model that amplifies small changes.

Every step holds a few tensors (the reconstruction in row chunks) or one decoder block, never a model.
"""

from __future__ import annotations

import gc
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from qlora_lite.merge.plan import MergePlan, merge_base_weight
from qlora_lite.merge.stream_forward import streamed_logits
from qlora_lite.model.folder import weight_files
from qlora_lite.model.loading import DTYPES, release_freed_memory
from qlora_lite.model.precision import choose_compute_dtype
from qlora_lite.storage.safetensors_io import TensorEntry, read_headers

# fp32 arithmetic: each product and sum of W + s * (B @ A) rounds once (unit roundoff 2**-24), so
# computing it errs by at most (rank + 2) units times the sum of the magnitudes (plus one for safety).
FP32_UNIT_ROUNDOFF = 2.0 ** -24


# Probe: largest |logit difference| relative to max |reference logit|. Both sides hold the same
# values in the same dtype, so anything above its reproducibility is a layout mistake, not noise.
PROBE_TOLERANCE = 1e-4


# Elements of a tensor compared at once: the chunk's few fp32 passes stay in the CPU caches.
_CHUNK_ELEMENTS = 1 << 18
# Bytes read back at once when the files are checksummed.
_READ_BYTES = 1 << 26


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
    """A base tensor as the training model multiplied by it (the probe's and the tests' reference side)."""
    return merge_base_weight(plan, key, tensor) if key in plan.quantized else tensor


# Mantissa bits stored by each output dtype: round-to-nearest errs by at most 2**-(bits+1) relative.
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def half_ulp_of(stored: torch.Tensor, as_fp32: torch.Tensor | None = None) -> torch.Tensor:
    """Half a unit in the last place of each value of ``stored`` (bf16, fp16 or fp32), as fp32.

    A normal value's unit is its power-of-two floor (its fp32 bits without the mantissa) times
    2**-bits; below the normals the units are those of the smallest normal.

    Args:
        as_fp32: ``stored.float()``, when the caller has it already.
    """
    bits, info = MANTISSA_BITS[stored.dtype], torch.finfo(stored.dtype)
    values = stored.float() if as_fp32 is None else as_fp32
    floor = (values.view(torch.int32) & 0x7F800000).view(torch.float32)
    return floor.mul_(2.0 ** -(bits + 1)).clamp_(min=info.smallest_normal * 2.0 ** -(bits + 1))


@dataclass
class _Factors:
    """One adapter layer in fp32, with the norms of the magnitude bound (computed once per tensor)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float
    dora: torch.Tensor | None  # (out,) magnitudes
    a_norms: torch.Tensor  # (in,) column norms of A
    b_norms: torch.Tensor  # (out,) row norms of B

    @classmethod
    def of(cls, plan: MergePlan, key: str) -> _Factors:
        lora_A, lora_B, scaling, dora = plan.lora[key]
        a, b = lora_A.float(), lora_B.float()
        return cls(a, b, scaling, None if dora is None else dora.float(), torch.linalg.norm(a, dim=0),
                   torch.linalg.norm(b, dim=1))


def _chunk_ratio(f: _Factors, conv1d: bool, start: int, base: torch.Tensor, stored: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|stored - exact| / bound, |stored - exact|)`` for rows ``start:`` of one merged weight, in
    fp32 (NaN or inf where the stored value is not finite).

    ``exact`` is ``W + s * B @ A`` computed here in fp32, so it and the merge each err by at most
    (rank + 3) fp32 units times the magnitudes ``|W| + |s| * |B| @ |A|``; those are bounded from above
    by the row norms of B times the column norms of A (Cauchy-Schwarz), without a second product.
    A correctly rounded stored value is within half its own unit in the last place of the true value
    (never less than the true value's half unit), so the bound is that plus both fp32 errors.

    Args:
        base, stored: the same rows of the merge base and of the merged tensor, in the stored layout:
            (out, in), or (in, out) for GPT-2's Conv1D.
        conv1d: GPT-2's Conv1D layout.
    """
    w = base.float()
    rows = slice(start, start + w.shape[0])
    if conv1d:  # stored rows are inputs: (W^T + s * (B @ A)^T)[rows] = W^T[rows] + s * A[:, rows]^T @ B^T
        exact = torch.addmm(w, f.a[:, rows].t(), f.b.t(), alpha=f.scaling)
        magnitude = torch.addr(w.abs(), f.a_norms[rows], f.b_norms, alpha=abs(f.scaling))
    else:
        exact = torch.addmm(w, f.b[rows], f.a, alpha=f.scaling)
        magnitude = torch.addr(w.abs(), f.b_norms[rows], f.a_norms, alpha=abs(f.scaling))
    terms = f.a.shape[0] + 3
    if f.dora is not None:  # rows are output channels (plan_merge refuses DoRA on Conv1D)
        scale = (f.dora[rows] / torch.linalg.norm(exact, dim=1)).unsqueeze(1)
        # the row norm sums a whole row: its roundoff grows with the row's length, on both sides
        exact.mul_(scale)
        magnitude.mul_(scale.abs())
        terms += exact.shape[1]
    values = stored.float()
    error = (values - exact).abs_()
    bound = magnitude.mul_(2 * terms * FP32_UNIT_ROUNDOFF).add_(half_ulp_of(stored, values))
    return error / bound, error


@dataclass
class StreamCheck:
    """Step 1 of the check, fed each tensor as the merge writes it (``tensor``), then read by
    ``verify_merge``: the first problem, the tensor closest to its bound, and each tensor's CRC-32."""

    plan: MergePlan
    dtype: str
    checked: int = 0
    worst: tuple[str | None, float] = (None, 0.0)
    problem: str | None = None
    problem_ratio: float = float("inf")
    crcs: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # tensor -> the shard file it is written to

    def tensor(self, key: str, base: torch.Tensor, stored: torch.Tensor) -> None:
        """Check one merged tensor as it will be written (``stored``, in the output dtype) against its
        merge base, in row chunks; record its bytes' CRC-32."""
        out = DTYPES[self.dtype]
        self.crcs[key] = zlib.crc32(stored.contiguous().view(-1).view(torch.uint8).numpy())
        if self.problem is not None:
            return
        where = f"tensor {key}" + (f" in {self.files[key]}" if key in self.files else "")
        expected_dtype = out if base.is_floating_point() else base.dtype
        if stored.dtype != expected_dtype or stored.shape != base.shape:
            self.problem = f"{where} is {stored.dtype} {tuple(stored.shape)}, expected {expected_dtype} {tuple(base.shape)}"
            return
        if key not in self.plan.lora:  # must be the base's, bit for bit
            if not torch.equal(stored, base.to(out) if base.is_floating_point() else base):
                self.problem = (f"{where} has no adapter, so it must equal the base's value in {self.dtype} bit for "
                                "bit, and it does not")
            self.checked += 1
            return
        rows = max(1, _CHUNK_ELEMENTS // max(1, stored[0].numel()))
        factors, conv1d = _Factors.of(self.plan, key), key in self.plan.conv1d
        worst = 0.0
        for start in range(0, stored.shape[0], rows):
            ratio, error = _chunk_ratio(factors, conv1d, start, base[start:start + rows], stored[start:start + rows])
            index = int(ratio.argmax())
            value = ratio.reshape(-1)[index].item()
            if not value <= 1.0:
                row, col = divmod(index, ratio.shape[-1]) if ratio.ndim == 2 else (index, 0)
                self.problem, self.problem_ratio = (
                    f"{where} differs from W + scale * B @ A (computed anew from the base) by "
                    f"{error.reshape(-1)[index].item():.3g} at index {[start + row, col]}, {value:.3g} times the bound "
                    f"there (half a {self.dtype} unit in the last place plus the fp32 rounding of the merge and of the "
                    "check)"), value
                return
            worst = max(worst, value)
        self.checked += 1
        if worst >= self.worst[1]:
            self.worst = (key, worst)

    def result(self) -> MergeCheck:
        if self.problem is not None:
            return MergeCheck(self.checked, self.worst[0], self.problem_ratio, None, None, self.problem)
        return MergeCheck(self.checked, self.worst[0], self.worst[1], None, None)


def _crc_on_disk(entry: TensorEntry) -> int:
    crc, left = 0, entry.nbytes
    buffer = bytearray(min(left, _READ_BYTES))
    with open(entry.file, "rb") as handle:
        handle.seek(entry.offset)
        while left:
            view = memoryview(buffer)[: min(left, len(buffer))]
            got = handle.readinto(view)
            if not got:
                break
            crc, left = zlib.crc32(view[:got], crc), left - got
    return crc if not left else -1


def check_files(plan: MergePlan, merged_dir: Path, dtype: str, crcs: dict[str, int]) -> str | None:
    """Step 2: the folder holds exactly the planned tensors, with the bytes step 1 checked.

    Returns:
        The first problem, or None.
    """
    out = DTYPES[dtype]
    merged = {e.name: e for e in read_headers(weight_files(merged_dir))}
    missing = [e.name for e in plan.entries if e.name not in merged]
    extra = sorted(set(merged) - {e.name for e in plan.entries})
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has tensors the base lacks: {', '.join(extra[:3])}"
        return f"the merged folder {what}"
    for entry in plan.entries:
        stored = merged[entry.name]
        expected_dtype = out if entry.dtype.is_floating_point else entry.dtype
        if tuple(stored.shape) != tuple(entry.shape) or stored.dtype != expected_dtype:
            return (f"tensor {entry.name} in {stored.file.name} is {stored.dtype} {tuple(stored.shape)}, "
                    f"expected {expected_dtype} {tuple(entry.shape)}")
        if _crc_on_disk(stored) != crcs.get(entry.name):
            return (f"tensor {entry.name} in {stored.file.name} reads back with other bytes than the merge wrote and "
                    "checked (a disk or file system problem, or another program writing into the folder)")
    return None


# Keys of config.json the merge writes anew: the weights' dtype, and the quantization it removes.
_MERGE_WRITES = ("dtype", "torch_dtype", "quantization_config", "transformers_version")


def config_changes(base: dict, merged: dict) -> list[str]:
    """Step 3: the top-level keys whose values differ between the base's and the merged config.json,
    besides those the merge writes anew (``_MERGE_WRITES``)."""
    keys = (set(base) | set(merged)) - set(_MERGE_WRITES)
    return sorted(k for k in keys if base.get(k, "<missing>") != merged.get(k, "<missing>"))


def _probe_dtype() -> torch.dtype:
    """bf16 where this CPU has bf16 matmul kernels, else fp32: never a dtype it is slow at."""
    return torch.bfloat16 if choose_compute_dtype("auto", "cpu").name == "bf16" else torch.float32


def _vocab_size(plan: MergePlan) -> int:
    return int(AutoConfig.from_pretrained(plan.base_dir).get_text_config().vocab_size)


def verify_merge(plan: MergePlan, merged_dir: Path, dtype: str, stream: StreamCheck, tolerance: float | None = None,
                 trust_remote_code: bool = False) -> MergeCheck:
    """Finish the check of a merged folder: step 1's verdict (``stream``, fed while writing), the files
    read back, the config, then the probe forward.

    Args:
        tolerance: largest allowed |logit difference| of the probe (default ``PROBE_TOLERANCE``
            times the largest reference logit).

    Returns:
        MergeCheck; ``problem`` says what failed first (the probe runs only after everything else passed).
    """

    result = stream.result()
    if result.problem is None and result.tensors != len(plan.entries):
        result.problem = f"the merge check saw {result.tensors} of the plan's {len(plan.entries)} tensors"
    if result.problem is None:
        result.problem = check_files(plan, merged_dir, dtype, stream.crcs)
    if result.problem is None:
        merged_config = merged_dir / "config.json"
        changed = config_changes(plan.config, json.loads(merged_config.read_text()))
        if changed:
            result.problem = (f"every tensor matches, but the merged {merged_config.name} differs from "
                              f"{plan.base_dir / 'config.json'} in {', '.join(changed)}: the folder would not load as "
                              "the same model")
    if result.problem is not None:
        return result
    ids = probe_ids(_vocab_size(plan))
    dtype = _probe_dtype()  # the same on both sides: see the module docstring
    expected = streamed_logits(merged_dir, dtype, ids, trust_remote_code=trust_remote_code, config_dir=plan.base_dir)
    gc.collect()
    release_freed_memory()
    got = streamed_logits(merged_dir, dtype, ids, trust_remote_code=trust_remote_code)
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
