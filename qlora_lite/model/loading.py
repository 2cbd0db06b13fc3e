"""Load a Hugging Face causal LM with its linear layers frozen in 4-bit, 8-bit or 16-bit.

The model skeleton is built on the meta device, then the checkpoint is streamed tensor by tensor:
each linear weight is quantized as soon as it is read and its 16-bit copy is dropped, so the whole
16-bit model never sits in memory. Embeddings, norms and the output head stay in the compute dtype.
"""

from __future__ import annotations

import ctypes
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

# ModelLoadError lives with the folder checks; every caller still imports it from here
from qlora_lite.errors import ModelLoadError
from qlora_lite.model.bnb import conv1d_class, quantize_linear, quantized_layer_names
from qlora_lite.model.folder import (
    iter_checkpoint_tensors,
    read_model_config,
    resolve_model_dir,
    weight_files,
)
from qlora_lite.model.precision import TORCH_NAMES

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, torch_name) for name, torch_name in TORCH_NAMES.items()}


def _transformers_renames(model: nn.Module, where) -> Callable[[str], str]:
    """transformers' own checkpoint key renames for ``model`` (GPT-NeoX's ``embed_out`` -> ``lm_head``,
    legacy ``LayerNorm.gamma`` and the like), as ``from_pretrained`` applies them.

    transformers 5 keeps them in ``conversion_mapping``; 4.x in the class attribute
    ``_checkpoint_conversion_mapping`` (regex -> replacement, the first match wins). Conversions that
    combine several tensors into one (fused experts) cannot be streamed tensor by tensor: a key they
    match is refused by name.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: PLC0415 (transformers 5 only)
        from transformers.core_model_loading import WeightConverter, WeightRenaming  # noqa: PLC0415 (transformers 5 only)
    except ImportError:
        mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
        legacy = getattr(model, "_fix_state_dict_key_on_load", None)  # LayerNorm.gamma -> .weight and the like

        def rename_4x(key: str) -> str:
            for pattern, replacement in mapping.items():
                key, count = re.subn(pattern, replacement, key)
                if count:
                    break
            return legacy(key)[0] if legacy is not None else key

        return rename_4x
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> str:
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        for converter in converters:
            if converter.rename_source_key(key)[1] is not None:
                raise ModelLoadError(f"{where}: checkpoint tensor {key} must be combined with others by transformers' "
                                     f"{type(converter).__name__} for {type(model).__name__}; the streaming loader "
                                     "reads one tensor at a time and cannot load this layout. Re-save the model "
                                     "with save_pretrained of the installed transformers, or use another model")
        return key

    return rename


def checkpoint_key_map(model: nn.Module, where="the checkpoint", wrapped: bool = False) -> Callable[[str], str | None]:
    """A function from a checkpoint key to ``model``'s parameter or buffer name, or None for a key the
    model does not use (buffers older files carry: attn.bias masks, rotary inv_freq).

    The one place that reads base checkpoint keys the way ``from_pretrained`` does: transformers'
    renames first, then its ``base_model_prefix`` rule (files of the bare model or of the head model,
    and old GPT-2 files without ``transformer.``). With ``wrapped``, a layer a LoRA wrapper moved to
    ``<layer>.base_layer`` is found there too. ``where`` names the folder in errors.
    """
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    prefix, rename = model.base_model_prefix, _transformers_renames(model, where)

    def resolve(key: str) -> str | None:
        key = rename(key)
        for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if candidate in names:
                return candidate
            owner, _, leaf = candidate.rpartition(".")
            if wrapped and owner and f"{owner}.base_layer.{leaf}" in names:
                return f"{owner}.base_layer.{leaf}"
        return None

    return resolve


# How the class names of causal LMs end in transformers (GPT2LMHeadModel, LlamaForCausalLM, and
# multimodal decoders such as Gemma3ForConditionalGeneration); encoder-decoders are refused apart.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_causal_lm(config, model_dir) -> None:
    """Refuse a model that is not a causal (decoder-only) LM before any weight is read.

    transformers maps some encoders to a causal class (BERT to BertLMHeadModel), which would train
    without complaint and learn nothing a decoder can use; config.json's ``architectures`` says what
    the checkpoint really is.

    Raises:
        ModelLoadError: naming the architecture and what to use instead.
    """
    archs = list(getattr(config, "architectures", None) or [])
    named = ", ".join(archs) or config.model_type
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    # transformers' own refusal lists every one of its ~200 causal config classes: say it in one line
    if (getattr(config, "is_encoder_decoder", False) or (archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs))
            or not (remote or type(config) in MODEL_FOR_CAUSAL_LM_MAPPING)):
        raise ModelLoadError(f"{model_dir}/config.json: {named} is not a causal language model (architectures "
                             f"should end in {' or '.join(_CAUSAL_SUFFIXES[:2])}); qlora-lite fine-tunes decoder-only "
                             "models such as Llama, Mistral, Qwen2, Gemma, Phi-3 or GPT-2")


def meta_model(config, *, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """The model ``config`` describes, its parameters on the meta device: every name, shape and layer
    kind, and no memory; loaders then put real tensors in place one at a time. Buffers (rotary tables,
    which no checkpoint holds) are built normally, on the CPU.

    Args:
        dtype: the dtype of the floating-point slots (None: transformers' default).
    """
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # settings a skeleton never uses (generation, attention backends)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the model's largest ``nn.ModuleList`` (``model.layers``, ``transformer.h``), as
    ``(its name, the list)``; streaming and FSDP both work block by block over them.

    Raises:
        ModelLoadError: the model has no ``nn.ModuleList`` (not a stacked decoder).
    """
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ModelLoadError(f"{type(model).__name__} has no list of decoder layers; cannot stream it block by block")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def load_base_model(
    model_path: str | Path,
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
    allow_bin_weights: bool = False,
) -> nn.Module:
    """Load a causal LM frozen in 4, 8 or 16 bits, streaming its checkpoint tensor by tensor.

    Args:
        model_path: a Hugging Face model folder (a hub id is resolved with ``snapshot_download``).
        bits: 4 (NF4/FP4 via Linear4bit), 8 (Linear8bitLt) or 16 (plain layers in ``compute_dtype``).

    Returns:
        The model in eval mode with every parameter frozen; ``model.qlora_quant`` records the settings.

    Raises:
        ModelLoadError: missing folder, missing or unreadable weights, or tensors the model lacks.
    """
    model_dir = resolve_model_dir(model_path)
    config = read_model_config(model_dir, trust_remote_code)
    check_causal_lm(config, model_dir)
    model = meta_model(config, trust_remote_code=trust_remote_code, dtype=compute_dtype)

    to_quantize = set(quantized_layer_names(model)) if bits in (4, 8) else set()
    conv1d = conv1d_class()
    resolve = checkpoint_key_map(model, model_dir)
    loaded, pending_bias = set(), {}
    for key, tensor in iter_checkpoint_tensors(weight_files(model_dir, allow_bin_weights)):
        name = resolve(key)
        if name is None:
            continue  # buffers older files carry (attn.bias masks, rotary inv_freq)
        owner, _, leaf = name.rpartition(".")
        if owner in to_quantize:
            # Weight and bias of one layer may arrive in either order; build the layer on the weight
            # if the bias is already here or the layer has none, else hold the weight briefly.
            pending_bias.setdefault(owner, {})[leaf] = tensor
            parts = pending_bias[owner]
            module = model.get_submodule(owner)
            if "weight" in parts and ("bias" in parts or module.bias is None):
                weight = parts["weight"].t() if isinstance(module, conv1d) else parts["weight"]
                layer = quantize_linear(weight, parts.get("bias"), bits=bits, quant_type=quant_type,
                                        double_quant=double_quant, compute_dtype=compute_dtype)
                parent, _, child = owner.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
                loaded.update(f"{owner}.{p}" for p in parts)
                del pending_bias[owner], parts, weight
                release_freed_memory()  # else glibc keeps each freed 16-bit weight (BENCHMARKS.md)
            continue
        value = tensor.to(compute_dtype) if tensor.is_floating_point() else tensor
        set_module_tensor_to_device(model, name, "cpu", value=value)
        loaded.add(name)

    if pending_bias:
        raise ModelLoadError(f"{model_dir}: incomplete layers in the checkpoint: {', '.join(sorted(pending_bias))}")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s) the {config.model_type} model needs, "
            f"e.g. {', '.join(missing[:5])}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model.qlora_quant = {"bits": bits, "quant_type": quant_type, "double_quant": double_quant,
                         "compute_dtype": compute_dtype, "path": str(model_path)}
    release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Return freed heap pages to the OS: glibc keeps the freed buffers of tensor-by-tensor quantization."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
