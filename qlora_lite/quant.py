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
from torch import nn

# ModelLoadError lives with the folder checks; every caller still imports it from here
from .model_files import (
    ModelLoadError,
    check_folder_json,
    check_headers,
    load_bin,
    read_json_file,
    read_model_config,
)

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bnb():
    """Import bitsandbytes lazily (it is slow to import and noisy about optional kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    """True for every layer kind LoRA can wrap: nn.Linear (incl. bitsandbytes subclasses) and Conv1D."""
    return isinstance(module, (nn.Linear, _conv1d_class()))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of any linear-like layer (Conv1D stores its weight as [in, out])."""
    if isinstance(module, _conv1d_class()):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an fp32 tensor of shape [out_features, in_features], whatever its storage.

    Works for nn.Linear, transformers' Conv1D (stored transposed), bitsandbytes Linear4bit
    (NF4/FP4, with or without double quantization) and Linear8bitLt.
    """
    bnb = _bnb()
    weight = module.weight
    if isinstance(weight, bnb.nn.Params4bit):
        state = weight.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        return bnb.functional.dequantize_4bit(data, state).float()
    if isinstance(weight, bnb.nn.Int8Params) or weight.dtype == torch.int8:
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = module.state.SCB
        return weight.data.float() * (scales.float().unsqueeze(1) / 127.0)
    if isinstance(module, _conv1d_class()):
        return weight.detach().float().t()
    return weight.detach().float()


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
    bnb = _bnb()
    out_features, in_features = weight.shape
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
            quant_type=quant_type, compress_statistics=double_quant, device="meta",
        )
        # bitsandbytes repacks CPU weights in place for eval-mode inference and changes the quant
        # state; our merge/save code reads the canonical layout, so the repack is switched off.
        layer.support_avx512bf16_for_cpu = False
        packed, state = bnb.functional.quantize_4bit(
            weight.to(compute_dtype).contiguous(), blocksize=64, quant_type=quant_type,
            compress_statistics=double_quant,
        )
        layer.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, quant_type=quant_type,
            compress_statistics=double_quant, blocksize=64, bnb_quantized=True, module=layer,
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


def weight_files(model_dir: Path, allow_bin_weights: bool = False) -> list[Path]:
    """The checkpoint files of a model folder, safetensors preferred.

    Raises:
        ModelLoadError: no weights, or only pickle-based ``.bin`` weights without opt-in.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_file(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no weight_map in the shard index; copy or download the model again")
        files = [model_dir / s for s in sorted(set(weight_map.values()))]
        check_headers(files)
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        check_headers(files)
        return files
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins and not allow_bin_weights:
        raise ModelLoadError(
            f"{model_dir} has only pickle-based .bin weights ({bins[0].name}). Pickle files can run code when "
            "loaded; convert them to safetensors, or pass --allow-bin-weights to load them with "
            "torch.load(weights_only=True)."
        )
    if bins:
        return bins
    raise ModelLoadError(f"{model_dir} holds no model weights (*.safetensors or pytorch_model*.bin)")


def iter_checkpoint_tensors(files: list[Path]):
    """Yield ``(name, tensor)`` pairs one at a time; each tensor is a private copy (no file mapping kept).

    Safetensors files are read with plain reads, not ``safe_open``: a memory map keeps every page
    read in the process RSS until the shard is closed (a whole shard on top of the load peak).
    """
    from .safetensors_io import SafetensorsError, iter_tensors, read_headers

    for path in files:
        if path.suffix == ".bin":
            state = load_bin(path)
            yield from state.items()
            del state
            continue
        try:
            entries = read_headers([path])
            for entry, tensor in iter_tensors(entries):
                yield entry.name, tensor
        except (SafetensorsError, OSError) as e:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from e


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Linear layers that get quantized: all of them except the output head."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if is_linear_like(m) and m is not head]


def _transformers_renames(model: nn.Module, where) -> Callable[[str], str]:
    """transformers' own checkpoint key renames for ``model`` (GPT-NeoX's ``embed_out`` -> ``lm_head``,
    legacy ``LayerNorm.gamma`` and the like), as ``from_pretrained`` applies them.

    transformers 5 keeps them in ``conversion_mapping``; 4.x in the class attribute
    ``_checkpoint_conversion_mapping`` (regex -> replacement, the first match wins). Conversions that
    combine several tensors into one (fused experts) cannot be streamed tensor by tensor: a key they
    match is refused by name.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
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
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    archs = list(getattr(config, "architectures", None) or [])
    named = ", ".join(archs) or config.model_type
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    # transformers' own refusal lists every one of its ~200 causal config classes: say it in one line
    if (getattr(config, "is_encoder_decoder", False) or (archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs))
            or not (remote or type(config) in MODEL_FOR_CAUSAL_LM_MAPPING)):
        raise ModelLoadError(f"{model_dir}/config.json: {named} is not a causal language model (architectures "
                             f"should end in {' or '.join(_CAUSAL_SUFFIXES[:2])}); qlora-lite fine-tunes decoder-only "
                             "models such as Llama, Mistral, Qwen2, Gemma, Phi-3 or GPT-2")


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
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(model_path)
    config = read_model_config(model_dir, trust_remote_code)
    check_causal_lm(config, model_dir)
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=compute_dtype)

    to_quantize = set(quantized_layer_names(model)) if bits in (4, 8) else set()
    conv1d = _conv1d_class()
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
                release_freed_memory()  # else glibc keeps each freed 16-bit weight (0.9 GB at 1.1B)
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


def resolve_model_dir(model_path: str | Path) -> Path:
    """A local folder as given, ``demo`` for the bundled demo model, or a hub id (needs network)."""
    path = Path(model_path).expanduser()
    if str(model_path) == "demo" and not path.exists():
        path = Path(__file__).resolve().parent / "demo_model"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder: config.json is missing")
        check_folder_json(path)  # a damaged file is named now, not as a traceback after the weights load
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass the model folder that holds config.json")
    if str(model_path).count("/") == 1 and not str(model_path).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(model_path), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                        "*.txt", "*.jinja"]))
        except Exception as e:
            raise ModelLoadError(f"{model_path}: not a local folder and the hub download failed ({e})") from e
    raise ModelLoadError(f"model folder {path} does not exist")


def load_tokenizer(model_path: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token guaranteed (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        # the tokenizers library reports a damaged file without naming it; its JSON was checked already
        raise ModelLoadError(f"{model_dir}: the tokenizer cannot be loaded ({str(e).splitlines()[0]}); copy the "
                             "tokenizer files (tokenizer.json, tokenizer_config.json, ...) from the original "
                             "model again") from None
    if tokenizer.pad_token is None:
        # Only used to fill the batch: labels mark padding by the attention mask, so a real EOS
        # sharing this id still counts in the loss.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:  # else batching fails later, far from the cause
        raise ModelLoadError(f"{model_dir}: the tokenizer defines no pad, EOS or unknown token (tokenizer_config.json "
                             "lost its special tokens?); copy the tokenizer files from the original model again")
    return tokenizer


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps ~1 GB after tensor-by-tensor quantization)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

