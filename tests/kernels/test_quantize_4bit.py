"""Our 4-bit quantizer writes exactly what bitsandbytes' writes: every byte, every absmax, the whole
double-quantization state, on every input kind a model holds (and refuses NaN and inf)."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

from qlora_lite.model.bnb import quantize_4bit


def _reference(weight, quant_type, double_quant):
    return F.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)


def _assert_same(weight, quant_type="nf4", double_quant=True):
    packed, state = quantize_4bit(weight, quant_type, double_quant)
    ref_packed, ref = _reference(weight, quant_type, double_quant)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref.absmax) and state.absmax.dtype == ref.absmax.dtype
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == (ref.shape, ref.dtype, ref.blocksize,
                                                                           ref.quant_type)
    assert torch.equal(state.code, ref.code)
    if double_quant:
        assert torch.equal(state.offset, ref.offset)
        assert torch.equal(state.state2.absmax, ref.state2.absmax) and torch.equal(state.state2.code, ref.state2.code)
        assert state.state2.blocksize == ref.state2.blocksize
    else:
        assert state.state2 is None and ref.state2 is None
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(ref_packed, ref))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_random_weights_quantize_byte_for_byte(quant_type, dtype, double_quant):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(384, 256, generator=g) * 0.02).to(dtype)
    _assert_same(weight, quant_type, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_real_weight_shapes_with_outliers_and_empty_blocks(quant_type):
    """Heavy tails (a few weights 100x the rest), an all-zero block, and enough blocks for several passes."""
    from qlora_lite.kernels import quantize_4bit as kernel

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(2 * kernel.CHUNK_BLOCKS * 64 // 512 + 3, 512, generator=g) * 0.02
    weight[torch.rand(weight.shape, generator=g) < 1e-3] *= 100
    weight[5, :64] = 0
    _assert_same(weight.to(torch.bfloat16), quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_at_and_next_to_every_code_boundary(quant_type):
    """A block whose absmax is 1 keeps its values as they are: put them on each rounding boundary and
    one float step either side, where a table lookup would go wrong first."""
    code = F.get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    values = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0)),
                        code, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    blocks = [torch.cat([torch.tensor([1.0]), values[i:i + 63]]) for i in range(0, len(values), 63)]
    weight = torch.cat([torch.nn.functional.pad(b, (0, 64 - len(b))) for b in blocks]).view(-1, 64)
    _assert_same(weight, quant_type, double_quant=False)


@pytest.mark.parametrize("shape", [(3, 40), (1, 65), (7, 9)])
def test_a_last_short_block_and_an_odd_count(shape):
    g = torch.Generator().manual_seed(2)
    _assert_same(torch.randn(shape, generator=g), "nf4", double_quant=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused_naming_where(bad):
    weight = torch.randn(4, 64)
    weight[2, 5] = bad
    with pytest.raises(ValueError, match="non-finite values .* near element 128"):
        quantize_4bit(weight)
