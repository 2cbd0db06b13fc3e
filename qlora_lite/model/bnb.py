"""Every bitsandbytes detail in one place: quantizing a linear layer to 4/8 bits and dequantizing it."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_lite.kernels.bnb_import import bnb
from qlora_lite.kernels.quantize_4bit import quantize_blocks

BLOCKSIZE = 64  # weights per 4-bit block (one absmax each), bitsandbytes' default
DQ_BLOCKSIZE = 256  # absmax values per block of the double quantization


def is_linear_like(module: nn.Module) -> bool:
    """True for every layer kind LoRA can wrap: nn.Linear (incl. bitsandbytes subclasses) and Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of any linear-like layer (Conv1D stores its weight as [in, out])."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an fp32 tensor of shape [out_features, in_features], whatever its storage.

    Works for nn.Linear, transformers' Conv1D (stored transposed), bitsandbytes Linear4bit
    (NF4/FP4, with or without double quantization) and Linear8bitLt.
    """
    weight = module.weight
    if isinstance(weight, bnb.nn.Params4bit):
        state = weight.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # noqa: PLC0415 (only bitsandbytes releases with the CPU layout have it)

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        return bnb.functional.dequantize_4bit(data, state).float()
    if isinstance(weight, bnb.nn.Int8Params) or weight.dtype == torch.int8:
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = module.state.SCB
        return weight.data.float() * (scales.float().unsqueeze(1) / 127.0)
    if isinstance(module, Conv1D):
        return weight.detach().float().t()
    return weight.detach().float()


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True):
    """``bitsandbytes.functional.quantize_4bit`` in blocks of ``BLOCKSIZE``, with the same bytes and
    quant state; on the CPU the codes come from ``kernels.quantize_4bit`` (much faster).

    Returns:
        ``(packed, QuantState)``.

    Raises:
        ValueError: the weight holds NaN or infinite values.
    """
    if weight.device.type != "cpu":
        if not torch.isfinite(weight).all():
            raise ValueError("non-finite values (NaN or inf) in the weight")
        return bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type=quant_type,
                                            compress_statistics=double_quant)
    code = bnb.functional.get_4bit_type(quant_type, device=weight.device)
    order = torch.argsort(code)  # bitsandbytes rounds to the nearest code: midpoints of the sorted codes
    packed, absmax = quantize_blocks(weight, (code[order[:-1]] + code[order[1:]]) / 2, order, BLOCKSIZE)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=BLOCKSIZE, code=code, quant_type=quant_type)
    if not double_quant:
        return packed, bnb.functional.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=DQ_BLOCKSIZE)
    return packed, bnb.functional.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Build a frozen bitsandbytes layer from a [out, in] weight.

    Args:
        weight: (out_features, in_features) tensor in any float dtype.
        bias: (out_features,) or None; kept in the compute dtype.
        bits: 4 or 8.

    Returns:
        ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt`` whose weight requires no grad.
    """
    out_features, in_features = weight.shape
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
            quant_type=quant_type, compress_statistics=double_quant, device="meta",
        )
        # bitsandbytes repacks CPU weights in place for eval-mode inference and changes the quant
        # state; our merge/save code reads the canonical layout, so the repack is switched off.
        layer.support_avx512bf16_for_cpu = False
        packed, state = quantize_4bit(weight.to(compute_dtype).contiguous(), quant_type, double_quant)
        layer.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, quant_type=quant_type,
            compress_statistics=double_quant, blocksize=BLOCKSIZE, bnb_quantized=True, module=layer,
        )
    elif bits == 8:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=0.0, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(
            weight.to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False
        ).to("cpu")
    else:
        raise ValueError(f"quantize_linear takes bits=4 or 8, got {bits}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(compute_dtype).clone(), requires_grad=False)
    return layer


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Linear layers that get quantized: all of them except the output head."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if is_linear_like(m) and m is not head]
