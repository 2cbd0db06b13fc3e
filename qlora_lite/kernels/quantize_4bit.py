"""4-bit blockwise quantization (NF4, FP4) on the CPU: byte for byte what bitsandbytes writes, faster.

bitsandbytes' CPU kernel finds the code of every value with ``torch.bucketize``, a binary search per
element that was most of the time of loading and merging a model (BENCHMARKS.md). Here a table over
``BINS`` equal bins of [-1, 1] gives each scaled value its code with one lookup and at most one
comparison. It is exact, not an approximation: a value's bin is a monotone function of the value,
computed in fp32 the same way for the values and for the code boundaries, so a boundary in an earlier
bin lies below every value of a later bin, and the one boundary a bin may hold is compared directly.

Everything else (the fp32 cast, each block's absmax, the scaling, the packing of two codes per byte)
repeats bitsandbytes' arithmetic operation for operation, so the bytes and the absmax are identical.
"""

from __future__ import annotations

import functools

import torch

BINS = 4096
# Blocks quantized per pass: the pass's fp32 values and codes stay in the CPU caches.
CHUNK_BLOCKS = 1 << 14


def _bin(scaled: torch.Tensor) -> torch.Tensor:
    """The table bin of values in [-1, 1] (int32); monotone in the value."""
    return ((scaled + 1.0) * (BINS / 2)).to(torch.int32).clamp_(0, BINS - 1)


@functools.lru_cache(maxsize=8)
def _tables(bounds: tuple[float, ...], order: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes below, boundary inside, code map)`` for each bin.

    ``bounds`` are the fp32 midpoints between the sorted code values, ``order`` maps a sorted position
    to the code's index (the identity for NF4).
    """
    edges = torch.tensor(bounds, dtype=torch.float32)
    where = _bin(edges)
    if len(set(where.tolist())) != len(bounds):
        raise ValueError(f"two code boundaries fall in one of {BINS} bins; raise BINS")
    below = (where.view(1, -1) < torch.arange(BINS).view(-1, 1)).sum(1).to(torch.uint8)
    inside = torch.full((BINS,), float("inf"))
    inside[where.long()] = edges
    return below, inside, torch.tensor(order, dtype=torch.uint8)


def _codes(scaled: torch.Tensor, below: torch.Tensor, inside: torch.Tensor, order: torch.Tensor | None):
    """Code index (uint8) of each scaled value: what ``order[bucketize(scaled, bounds)]`` gives."""
    bins = _bin(scaled)
    codes = torch.index_select(below, 0, bins) + (scaled > torch.index_select(inside, 0, bins))
    return codes if order is None else torch.index_select(order, 0, codes.to(torch.int32))


def quantize_blocks(A: torch.Tensor, bounds: torch.Tensor, order: torch.Tensor, blocksize: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``A`` (any shape, a float dtype) in blocks of ``blocksize`` values to 4-bit codes.

    Args:
        bounds: (15,) fp32 midpoints between the sorted code values (bitsandbytes' quantize bounds).
        order: (16,) code index of each sorted position.

    Returns:
        ``(packed, absmax)``: (ceil(n / 2), 1) uint8, two codes per byte (the first in the high
        nibble), and (ceil(n / blocksize),) fp32, as bitsandbytes' ``quantize_4bit`` kernel returns them.

    Raises:
        ValueError: ``A`` holds NaN or infinite values (no 4-bit code stands for them).
    """
    identity = order.tolist() == list(range(len(order)))
    below, inside, code_map = _tables(tuple(bounds.tolist()), tuple(order.tolist()))
    code_map = None if identity else code_map
    flat = A.reshape(-1)
    n = flat.numel()
    full_blocks, rest = divmod(n, blocksize)
    codes = torch.empty(n + (n % 2), dtype=torch.uint8)
    absmax = torch.empty(full_blocks + (1 if rest else 0), dtype=torch.float32)
    for start in range(0, full_blocks, CHUNK_BLOCKS):
        end = min(full_blocks, start + CHUNK_BLOCKS)
        values = flat[start * blocksize:end * blocksize].float().reshape(-1, blocksize)
        block_max = values.abs().max(dim=-1)[0]
        scaled = torch.clamp(values * (1.0 / block_max.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        codes[start * blocksize:end * blocksize] = _codes(scaled, below, inside, code_map)
        absmax[start:end] = block_max
    if rest:  # a last, shorter block: bitsandbytes divides it by its absmax instead of multiplying
        values = flat[full_blocks * blocksize:].float()
        block_max = values.abs().max().clamp(min=1e-38)
        codes[full_blocks * blocksize:n] = _codes(torch.clamp(values / block_max, -1, 1), below, inside, code_map)
        absmax[-1] = block_max
    if n % 2:  # bitsandbytes pads an odd count with a scaled 0.0
        codes[n:] = _codes(torch.zeros(1), below, inside, code_map)
    if not torch.isfinite(absmax).all():
        bad = int(torch.nonzero(~torch.isfinite(absmax))[0]) * blocksize
        raise ValueError(f"non-finite values (NaN or inf) in the weight, first near element {bad}")
    pairs = codes.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1), absmax
