"""Which GGML type each tensor gets for an export type, as llama-quantize decides it.

A "_M" file is not one type: llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) gives
some tensors more bits (output.weight Q6_K; attn_v and ffn_down Q6_K on the layers
``use_more_bits`` picks) and falls back to a 32-value block type where a row does not split into
256-value K-quant blocks. This module mirrors that logic for the types ``export-gguf`` writes, by
tensor name alone, so it holds for any architecture whose names follow llama.cpp's (``blk.N.attn_v``).

Arch-specific branches llama.cpp has there: Falcon (ffn_down, attn_output, output), the 70B LLaMA /
Qwen2 shape (80 layers, grouped-query: attn_v Q4_K -> Q5_K), mixture-of-experts models with 8
experts (Q8_0 attn_v / attn_k), GLM5-next and BailingMoE3. Gemma 2 / Gemma 3 and Phi-3 have no
branch of their own: Gemma ties its embeddings (token_embd.weight is then treated as the output
tensor), Phi-3's fused attn_qkv is counted and treated as attn_v, its fused gate+up is ffn_up.
"""

from __future__ import annotations

import re

import gguf

from qlora_lite.errors import GGUFExportError
from qlora_lite.gguf.quantize import BLOCKS

# export type -> (default GGML type of its 2-D weights, general.file_type llama.cpp writes)
EXPORT_TYPES = {
    "f16": ("f16", gguf.LlamaFileType.MOSTLY_F16),
    "bf16": ("bf16", gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": ("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0),
    "q5_0": ("q5_0", gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_k_m": ("q4_k", gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": ("q5_k", gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": ("q6_k", gguf.LlamaFileType.MOSTLY_Q6_K),
}
# The types llama-quantize makes from the f16 file: every quantized block (Q8_0 fallbacks too) starts
# from fp16 values.
FROM_F16 = ("q4_0", "q5_0", "q4_k_m", "q5_k_m", "q6_k")
# tensor_type_fallback: a K-quant whose rows do not split into 256 values
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def file_type(out_type: str) -> gguf.LlamaFileType:
    """The ``general.file_type`` llama.cpp writes for ``out_type`` (e.g. MOSTLY_Q4_K_M)."""
    return EXPORT_TYPES[out_type][1]


def _block(kind: str) -> int:
    return BLOCKS[kind][0] if kind in BLOCKS else 1


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _layer(name: str, n_layers: int) -> int:
    match = _LAYER.match(name)
    if match is None or int(match.group(1)) >= n_layers:
        raise GGUFExportError(f"tensor {name}: expected a blk.N. name with N below the {n_layers} layers")
    return int(match.group(1))


def _fallback(kind: str, ncols: int) -> str:
    if ncols % _block(kind) == 0:
        return kind
    kind = _FALLBACK.get(kind, kind)
    return kind if ncols % _block(kind) == 0 else "f16"


def tensor_type(out_type: str, name: str, shape: tuple[int, ...], *, n_layers: int, tied: bool,
                arch: str = "", n_head: int = 0, n_head_kv: int = 0) -> str:
    """The GGML type (f32, f16, bf16, q8_0, q4_0, q5_0, q5_1, q4_k, q5_k, q6_k) of one written tensor.

    For f16, bf16 and q8_0 this is what convert_hf_to_gguf.py writes; for the others what
    llama-quantize (no importance matrix) makes of that f16 file.

    Args:
        out_type: one of ``EXPORT_TYPES``.
        name: the GGUF tensor name (``blk.3.attn_v.weight``).
        shape: PyTorch order, rows last: (rows, row length).
        n_layers: the block count.
        tied: the file has no output.weight (token_embd.weight is then the output tensor too).
        arch, n_head, n_head_kv: the GGUF architecture and head counts, for the 70B rule.

    Raises:
        GGUFExportError: unknown ``out_type``; a per-layer tensor whose name has no valid layer.
    """
    if out_type not in EXPORT_TYPES:
        raise GGUFExportError(f"--type must be one of {', '.join(EXPORT_TYPES)}, got {out_type!r}")
    if len(shape) < 2:
        return "f32"  # norms, biases, rope factors
    default, _ = EXPORT_TYPES[out_type]
    ncols = shape[-1]
    if default in ("f16", "bf16"):
        return default
    if default == "q8_0":  # convert_hf_to_gguf.py: Q8_0, or F16 for rows that do not split into 32
        return _fallback(default, ncols)
    # tensor_allows_quantization: the f16 file's type stays for anything else
    if not name.endswith("weight") or "_norm.weight" in name:
        return "f16"
    kind = default
    if name == "output.weight" or (tied and name in ("token_embd.weight", "per_layer_token_embd.weight")):
        kind = "q8_0" if ncols % _block(default) else "q6_k"
    elif re.search(r"attn_(v|qkv|kv_b)\.weight", name):
        if out_type in ("q4_k_m", "q5_k_m") and use_more_bits(_layer(name, n_layers), n_layers):
            kind = "q6_k"
        seventy_b = n_layers == 80 and (arch == "qwen2" or (arch == "llama" and n_head != n_head_kv))
        if seventy_b and kind == "q4_k":
            kind = "q5_k"
    elif "ffn_down" in name and out_type in ("q4_k_m", "q5_k_m") and use_more_bits(_layer(name, n_layers), n_layers):
        kind = "q6_k"
    return _fallback(kind, ncols)

