"""GGML block quantizers (Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) whose bytes equal llama.cpp's.

llama-quantize without an importance matrix runs the reference quantizers of ggml-quants.c
(``quantize_row_q4_K_ref`` ...), in float32 without fused multiply-adds. These are the same
algorithms, vectorized across blocks: every elementwise step is one numpy float32 operation over
all blocks of a chunk, and every sum over the values of a block is accumulated one position after
the other (``_seq_sum``), as the C loops do, so each rounding happens as it does there (numpy's
own ``sum`` adds pairwise and would differ in the last bit). Values are kept position-major,
``(values per block, blocks)``, so a position is one contiguous row. Rounding to the nearest
integer is ``np.rint`` (ties to even, what ``nearest_int``'s magic-number trick computes for the
small values that occur), fp16 conversion is numpy's round-to-nearest-even (``GGML_FP32_TO_FP16``).

Row chunks are quantized on a few threads (numpy releases the GIL inside its loops), each chunk
small enough to stay in the CPU caches, so memory stays at about the input plus the output.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qlora_lite.errors import GGUFExportError

QK_K = 256
# kind -> (values per block, bytes per block)
BLOCKS = {"q4_0": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34), "q4_k": (QK_K, 144), "q5_k": (QK_K, 176),
          "q6_k": (QK_K, 210)}
_GROUP_MAX_EPS = np.float32(1e-15)
_F16_NOTE = ", after rounding to fp16 as the f16 file llama-quantize reads holds them (|x| > 65504 is inf)"
_CHUNK_VALUES = 1 << 18  # values quantized per step of one thread: the temporaries stay in L2


def _f32(value: float) -> np.float32:
    return np.float32(value)


def _seq_sum(rows: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in order, from 0.0, in float32: ``s = 0; for r in rows: s += r`` (the C loops)."""
    total = np.zeros(rows.shape[1:], np.float32)
    for row in rows:
        total += row
    return total


def _fp16(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return values.astype(np.float16)


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude along axis 0, the first one on ties; +0.0 when all are zero.

    The C loops start from ``amax = max = 0`` and take a value only if strictly larger in magnitude.
    """
    pick = np.take_along_axis(x, np.abs(x).argmax(axis=0)[None], axis=0)[0]
    return np.where(np.abs(pick) > 0, pick, _f32(0.0))


def _reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, _f32(1.0) / d, _f32(0.0)).astype(np.float32)


# ---------------------------------------------------------------------------- 32-value blocks


def _q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=0)
    d = amax / _f32(127)
    scaled = (x * _reciprocal_or_zero(d)).astype(np.float64)
    qs = np.trunc(scaled + np.copysign(0.5, scaled)).astype(np.int8)  # roundf: halves away from zero
    return _pack(x.shape[1], [_fp16(d).view(np.uint8).reshape(-1, 2), qs.T.view(np.uint8)])


def _q4_0_or_q5_0(x: np.ndarray, bits: int) -> np.ndarray:
    top = 1 << (bits - 1)  # 8 or 16
    d = _first_absmax(x) / _f32(-top)
    scaled = x * _reciprocal_or_zero(d)
    q = np.minimum(2 * top - 1, np.trunc(scaled + _f32(top + 0.5)).astype(np.int32)).astype(np.uint32)  # (int8_t) cast
    low, high = q[:16], q[16:]
    qs = ((low & 0xF) | ((high & 0xF) << 4)).astype(np.uint8).T
    parts = [_fp16(d).view(np.uint8).reshape(-1, 2)]
    if bits == 5:
        shifts = np.arange(16, dtype=np.uint32)[:, None]
        qh = (((low >> 4) << shifts) | ((high >> 4) << (shifts + 16))).sum(axis=0, dtype=np.uint32)
        parts.append(qh.astype("<u4").view(np.uint8).reshape(-1, 4))
    return _pack(x.shape[1], parts + [qs])


def _q5_1(x: np.ndarray) -> np.ndarray:
    """Q5_1 (x = d * q + m): llama.cpp's fallback for a Q5_K matrix whose rows do not split into 256."""
    lo = np.take_along_axis(x, x.argmin(axis=0)[None], axis=0)[0]  # the first minimum, as the C scan keeps
    hi = np.take_along_axis(x, x.argmax(axis=0)[None], axis=0)[0]
    d = (hi - lo) / _f32(31)
    q = (np.trunc((x - lo) * _reciprocal_or_zero(d) + _f32(0.5)).astype(np.int32) & 0xFF).astype(np.uint32)
    low, high = q[:16], q[16:]
    shifts = np.arange(16, dtype=np.uint32)[:, None]
    qh = ((((low & 0x10) >> 4) << shifts) | (((high & 0x10) >> 4) << (shifts + 16))).sum(axis=0, dtype=np.uint32)
    qs = ((low & 0xF) | ((high & 0xF) << 4)).astype(np.uint8).T
    return _pack(x.shape[1], [_fp16(d).view(np.uint8).reshape(-1, 2), _fp16(lo).view(np.uint8).reshape(-1, 2),
                              qh.astype("<u4").view(np.uint8).reshape(-1, 4), qs])


# ---------------------------------------------------------------------------- K-quant helpers


def make_qkx2_quants(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """``make_qkx2_quants`` of ggml-quants.c for groups of 32 with llama.cpp's weights, per column.

    Args:
        x: (32, groups) float32, one group per column.

    Returns:
        ``(L, scale, the_min)``: levels (32, groups) float32 in [0, nmax], scale and minus the min (groups,).
    """
    sum_x2 = _seq_sum(x * x)
    w = np.sqrt(sum_x2 / _f32(32)) + np.abs(x)
    lo, hi = x.min(axis=0), x.max(axis=0)
    sum_w = w[0].copy()
    sum_x = w[0] * x[0]
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = np.where(lo > 0, _f32(0), lo)
    flat = hi == lo
    trial, error = np.empty_like(x), np.empty_like(x)
    products = np.empty((3, *x.shape), np.float32)  # w*l, w*l*l, w*l*x: summed together, row by row
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _f32(nmax) / (hi - lo)
        scale = _f32(1) / iscale
        levels = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
        best_error = _seq_sum(w * np.square(scale * levels + lo - x))
        for step in range(nstep + 1):
            iscale = (_f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax)) / (hi - lo)
            np.subtract(x, lo, out=trial)
            trial *= iscale
            np.clip(np.rint(trial, out=trial), 0, nmax, out=trial)
            np.multiply(w, trial, out=products[0])
            np.multiply(products[0], trial, out=products[1])
            np.multiply(products[0], x, out=products[2])
            sum_l, sum_l2, sum_xl = _seq_sum(products.swapaxes(0, 1))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, _f32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            np.multiply(this_scale, trial, out=error)
            error += this_min
            error -= x
            np.square(error, out=error)
            error *= w
            cur_error = _seq_sum(error)
            better = (det > 0) & (cur_error < best_error) & ~flat
            np.copyto(levels, trial, where=better)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    levels = np.where(flat, _f32(0), levels)
    scale = np.where(flat, _f32(0), scale)
    return levels, scale, -lo


def make_qx_quants(x: np.ndarray, nmax: int):
    """``make_qx_quants`` of ggml-quants.c with ``rmse_type=1`` and no importance weights, per column.

    Args:
        x: (16, groups) float32, one group per column.

    Returns:
        ``(L, scale)``: levels (16, groups) float32 in [0, 2*nmax), scale (groups,).
    """
    peak = _first_absmax(x)
    zero = np.abs(peak) < _GROUP_MAX_EPS
    wx = x * x * x  # w * x[i] with w = x[i]^2
    w = x * x
    q = np.empty_like(x)
    products = np.empty((2, *x.shape), np.float32)  # w*x*l and w*l*l, summed together row by row
    with np.errstate(divide="ignore", invalid="ignore"):
        def trial(iscale):
            np.multiply(iscale, x, out=q)
            np.clip(np.rint(q, out=q), -nmax, nmax - 1, out=q)
            np.multiply(wx, q, out=products[0])
            np.multiply(w, q, out=products[1])
            products[1] *= q
            return _seq_sum(products.swapaxes(0, 1))

        sumlx, suml2 = trial(_f32(-nmax) / peak)
        levels = q.copy()  # without the +nmax offset until the end
        scale = np.where(suml2 != 0, sumlx / suml2, _f32(0))
        best = scale * sumlx
        for step in [*range(-9, 0), *range(1, 10)]:
            sumlx, suml2 = trial(-(_f32(nmax) + _f32(0.1) * _f32(step)) / peak)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(levels, q, where=better)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    levels += nmax
    return np.where(zero, _f32(0), levels), np.where(zero, _f32(0), scale)


def _pack(n_blocks: int, parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-block byte fields (each (n_blocks, k) uint8) in struct order."""
    return np.concatenate([p.reshape(n_blocks, -1).astype(np.uint8, copy=False) for p in parts], axis=1)


# ---------------------------------------------------------------------------- Q4_K, Q5_K, Q6_K


def _q4_k_or_q5_k(x: np.ndarray, bits: int) -> np.ndarray:
    n_blocks = x.shape[1]
    nmax = (1 << bits) - 1
    groups = x.reshape(8, 32, n_blocks).transpose(1, 0, 2).reshape(32, 8 * n_blocks)  # (32, group)
    rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
    levels, scales, mins = make_qkx2_quants(groups, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(8, n_blocks), mins.reshape(8, n_blocks)
    max_scale = np.maximum(scales.max(axis=0), _f32(0))
    max_min = np.maximum(mins.max(axis=0), _f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _f32(63) / max_scale, _f32(0))
        inv_min = np.where(max_min > 0, _f32(63) / max_min, _f32(0))
    ls = np.minimum(np.rint(inv_scale * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)  # (8, block)
    lm = np.minimum(np.rint(inv_min * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d, dmin = _fp16(max_scale / _f32(63)), _fp16(max_min / _f32(63))
    sub_d = d.astype(np.float32) * ls.astype(np.float32)  # (8, block)
    sub_m = dmin.astype(np.float32) * lm.astype(np.float32)
    x3 = x.reshape(8, 32, n_blocks)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint((x3 + sub_m[:, None]) / sub_d[:, None]), 0, nmax)
    levels = levels.reshape(32, 8, n_blocks).transpose(1, 0, 2)
    levels = np.where(sub_d[:, None] != 0, requant, levels).astype(np.uint8).reshape(4, 2, 32, n_blocks)
    scale_bytes = np.empty((12, n_blocks), np.uint8)
    scale_bytes[:4], scale_bytes[4:8] = ls[:4] | ((ls[4:] >> 4) << 6), lm[:4] | ((lm[4:] >> 4) << 6)
    scale_bytes[8:] = (ls[4:] & 0xF) | ((lm[4:] & 0xF) << 4)
    parts = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scale_bytes.T]
    low, high = levels[:, 0], levels[:, 1]  # (4, 32, block): values 64k + j and 64k + 32 + j
    if bits == 5:
        shifts = (2 * np.arange(4, dtype=np.uint8))[:, None, None]
        qh = (((low >> 4) << shifts) | ((high >> 4) << (shifts + 1))).sum(axis=0, dtype=np.uint8)
        parts.append(qh.T)
        low, high = low & 0xF, high & 0xF
    parts.append((low | (high << 4)).reshape(128, n_blocks).T)
    return _pack(n_blocks, parts)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n_blocks = x.shape[1]
    groups = x.reshape(16, 16, n_blocks).transpose(1, 0, 2).reshape(16, 16 * n_blocks)
    levels, scales = make_qx_quants(groups, 32)
    scales = scales.reshape(16, n_blocks)
    max_scale = _first_absmax(scales)
    empty = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _f32(-128) / max_scale
        d = _fp16(_f32(1) / iscale)
        q_scales = np.minimum(127, np.rint(iscale * scales)).astype(np.int64)
    q_scales = (((q_scales + 128) & 0xFF) - 128).astype(np.int8)  # stored in an int8_t
    sub_d = d.astype(np.float32) * q_scales.astype(np.float32)  # (16, block)
    x3 = x.reshape(16, 16, n_blocks)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint(x3 / sub_d[:, None]), -32, 31) + 32
    levels = levels.reshape(16, 16, n_blocks).transpose(1, 0, 2)
    levels = np.where(sub_d[:, None] != 0, requant, levels).astype(np.uint8).reshape(2, 4, 32, n_blocks)
    ql = np.stack([(levels[:, 0] & 0xF) | ((levels[:, 2] & 0xF) << 4),
                   (levels[:, 1] & 0xF) | ((levels[:, 3] & 0xF) << 4)], axis=1)  # (2, 2, 32, block)
    qh = (levels[:, 0] >> 4) | ((levels[:, 1] >> 4) << 2) | ((levels[:, 2] >> 4) << 4) | ((levels[:, 3] >> 4) << 6)
    out = _pack(n_blocks, [ql.reshape(128, n_blocks).T, qh.reshape(64, n_blocks).T, q_scales.view(np.uint8).T,
                           d.view(np.uint8).reshape(-1, 2)])
    out[empty] = 0
    return out


_QUANTIZERS = {"q4_0": lambda x: _q4_0_or_q5_0(x, 4), "q5_0": lambda x: _q4_0_or_q5_0(x, 5), "q5_1": _q5_1,
               "q8_0": _q8_0,
               "q4_k": lambda x: _q4_k_or_q5_k(x, 4), "q5_k": lambda x: _q4_k_or_q5_k(x, 5), "q6_k": _q6_k}


def _quantize_blocks(blocks: np.ndarray, kind: str) -> np.ndarray:
    """(n, block values) float32 -> (n, block bytes) uint8."""
    return _QUANTIZERS[kind](np.ascontiguousarray(blocks.T))


def quantize(array: np.ndarray, kind: str, threads: int | None = None, name: str = "tensor") -> np.ndarray:
    """Quantize ``array`` row-wise into GGML ``kind`` blocks, byte for byte as llama.cpp does.

    Args:
        array: (..., n) float32 with n a multiple of the block size (32, or 256 for the K-quants).
        kind: q4_0, q5_0, q5_1, q8_0, q4_k, q5_k or q6_k.
        threads: threads to use; default: the CPUs this process may run on.
        name: names the tensor in an error.

    Returns:
        (..., n // block * block_bytes) uint8, the layout ``gguf.GGUFWriter`` expects for a quantized tensor.

    Raises:
        GGUFExportError: unknown ``kind``, a row length that is not a multiple of its block, inf or NaN values.
    """
    if kind not in BLOCKS:
        raise GGUFExportError(f"{name}: no quantizer for type {kind!r}; known: {', '.join(BLOCKS)}")
    block, nbytes = BLOCKS[kind]
    if array.ndim == 0 or array.shape[-1] % block:
        raise GGUFExportError(f"{name}: rows of {array.shape[-1] if array.ndim else 0} values do not split into "
                              f"{kind.upper()} blocks of {block}")
    blocks = np.ascontiguousarray(array, dtype=np.float32).reshape(-1, block)
    if not np.isfinite(blocks).all():
        bad = np.flatnonzero(~np.isfinite(blocks).all(axis=1))
        raise GGUFExportError(f"{name}: {bad.size} blocks of {block} values hold inf or NaN (the first at value "
                              f"{bad[0] * block} of the flattened tensor){_F16_NOTE if kind != 'q8_0' else ''}; "
                              "the model's weights are broken there, or too large for this type")
    out = np.empty((blocks.shape[0], nbytes), np.uint8)
    step = max(1, _CHUNK_VALUES // block)
    starts = range(0, blocks.shape[0], step)

    def run(start: int) -> None:
        out[start:start + step] = _quantize_blocks(blocks[start:start + step], kind)

    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(run, starts))
    else:
        for start in starts:
            run(start)
    return out.reshape(*array.shape[:-1], array.shape[-1] // block * nbytes)
