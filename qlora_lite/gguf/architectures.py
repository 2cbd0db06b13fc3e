"""What each model family needs in a GGUF file, one section per family.

An ``Architecture`` says, for the Hugging Face ``model_type`` s of one family: the GGUF architecture
llama.cpp knows it by, the hyper-parameters it reads beyond the shared ones, how a checkpoint tensor
becomes the tensor llama.cpp expects (q/k permutation, Gemma's +1 norms), which tensors are left out,
the tensors made from the config (RoPE factors), and what llama.cpp cannot represent (refused before
any work). The reference for every fact is llama.cpp's convert_hf_to_gguf.py and, for what it needs
to load a file, src/models/<arch>.cpp. Adding a family touches only this file.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import gguf
import torch

log = logging.getLogger(__name__)

_SKIP = re.compile(r"rotary_emb\.inv_freq$|\.attn\.(masked_)?bias$")


@dataclass(frozen=True)
class Architecture:
    """How one family is written.

    Attributes:
        name: the GGUF architecture (``general.architecture``), e.g. "llama", "gemma2".
        hparams: ``(writer, config)``: adds the ``{arch}.*`` keys.
        transform: ``(config, key, tensor) -> tensor``: the checkpoint tensor as llama.cpp wants it.
        skip: ``(config, key) -> bool``: a checkpoint tensor that is not written.
        extra_tensors: ``config -> {gguf_name: 1-D float32 tensor}`` written before the checkpoint's.
        problems: ``config -> [message]``: what llama.cpp would load but compute differently.
        required_keys: metadata keys (``gguf.Keys`` templates) the read-back check insists on
            beyond the ones every architecture needs.
        text_config: ``config -> config`` of the language model (a multimodal folder nests it).
        rename: ``key -> key`` the language model's checkpoint name (GGUF names are looked up by it),
            or None for a tensor that is not part of it (not written).
    """

    name: str
    hparams: Callable
    transform: Callable = lambda config, key, tensor: tensor
    skip: Callable = lambda config, key: _skipped(config, key)
    extra_tensors: Callable = lambda config: {}
    problems: Callable = lambda config: []
    required_keys: tuple[str, ...] = ()
    text_config: Callable = lambda config: config
    rename: Callable = lambda key: key

    @property
    def model_arch(self) -> gguf.MODEL_ARCH:
        return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == self.name)


def _skipped(config: dict, key: str) -> bool:
    """Buffers llama.cpp recomputes, and a tied head (llama.cpp reuses token_embd.weight)."""
    return bool(_SKIP.search(key)) or (config.get("tie_word_embeddings", False) and key == "lm_head.weight")


# ---------------------------------------------------------------- shared by every family

def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_parameters(config: dict, layer_type: str = "full_attention") -> dict:
    """RoPE settings: ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5, per layer type for Gemma 3)."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return params.get(layer_type, {}) if "full_attention" in params else params


def rope_theta(config: dict, layer_type: str = "full_attention") -> float:
    return float(rope_parameters(config, layer_type).get("rope_theta") or config.get("rope_theta") or 10000.0)


def _rope_type(config: dict) -> str | None:
    params = rope_parameters(config)
    return params.get("rope_type", params.get("type"))


def shared_hparams(writer, config: dict, *, handled_rope: tuple[str, ...] = ()) -> None:
    """The keys every family here has, as llama.cpp's converter writes them (``{arch}.context_length`` ...).

    Args:
        handled_rope: RoPE scaling types the family writes itself (no warning for those).
    """
    heads = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    if head_dim(config) != config["hidden_size"] // heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    rope_type = _rope_type(config)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_parameters(config)["factor"])
    elif rope_type not in (None, "default", "linear", *handled_rope):
        log.warning("rope scaling %r is not written to the GGUF file; long-context behaviour may differ", rope_type)


# ---------------------------------------------------------------- Llama, Mistral

def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """Reorder the rows of a q/k projection from HF's rotate-half layout to llama.cpp's interleaved one.

    Args:
        weight: (n_head * head_dim, in) or a bias (n_head * head_dim,).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama3_rope_factors(config: dict) -> torch.Tensor | None:
    """Llama 3.1+ frequency divisors (head_dim/2,), stored as ``rope_freqs.weight`` as llama.cpp does.

    llama.cpp divides each rotary frequency by its factor; None when the model has no llama3 scaling.
    """
    if _rope_type(config) != "llama3":
        return None
    scaling, dim = rope_parameters(config), head_dim(config)
    freqs = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)  # between the two bands: interpolate
    factors = torch.where(wavelen < old_context / high, torch.ones_like(freqs), factors)  # high frequencies kept
    return torch.where(wavelen > old_context / low, torch.full_like(freqs, factor), factors).float()


def _llama_hparams(writer, config: dict) -> None:
    shared_hparams(writer, config, handled_rope=("llama3",))
    writer.add_rope_dimension_count(head_dim(config))


def _llama_transform(config: dict, key: str, tensor: torch.Tensor) -> torch.Tensor:
    heads = config["num_attention_heads"]
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_qk(tensor, heads, heads)
    if key.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_qk(tensor, heads, config.get("num_key_value_heads") or heads)
    return tensor


def _llama_extra(config: dict) -> dict[str, torch.Tensor]:
    factors = llama3_rope_factors(config)
    return {} if factors is None else {"rope_freqs.weight": factors}


LLAMA = Architecture("llama", _llama_hparams, transform=_llama_transform, extra_tensors=_llama_extra,
                     required_keys=(gguf.Keys.Rope.DIMENSION_COUNT,))

# ---------------------------------------------------------------- Qwen2, Qwen3 (q/k norms: same names)

QWEN2 = Architecture("qwen2", shared_hparams)
QWEN3 = Architecture("qwen3", shared_hparams)

# ---------------------------------------------------------------- Gemma 2, Gemma 3 (text)
# Gemma's RMSNorm scales by (1 + weight); llama.cpp's by weight, so every *norm.weight is written +1
# (q/k norms of Gemma 3 too). The embedding scale sqrt(hidden) and GELU-tanh are in llama.cpp's graph.
# llama.cpp derives the attention scale itself: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the
# layer counts of the 27B models; query_pre_attn_scalar is checked against that, not written.

_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}  # llama.cpp's default pattern: the last layer of each period is full


def _gemma_transform(config: dict, key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() + 1 if key.endswith("norm.weight") else tensor


def _swa_pattern(writer, config: dict, arch: str) -> None:
    """Write which layers slide only where ``layer_types`` differs from llama.cpp's default period.

    (An integer or no key is what older llama.cpp builds read; the per-layer array only when needed.)
    """
    types = config.get("layer_types")
    if not types:
        return
    sliding = [t == "sliding_attention" for t in types]
    period = _SWA_PERIOD[arch]
    if sliding != [i % period < period - 1 for i in range(len(sliding))]:
        writer.add_sliding_window_pattern(sliding)


def _gemma_problems(arch: str) -> Callable:
    def problems(config: dict) -> list[str]:
        found = []
        big = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
        derived = config["hidden_size"] // config["num_attention_heads"] if big else head_dim(config)
        scalar = config.get("query_pre_attn_scalar", derived)
        if scalar != derived:
            found.append(f"query_pre_attn_scalar is {scalar}, but llama.cpp scales {arch} attention by "
                         f"1/sqrt({derived}) for this shape ({'hidden/heads' if big else 'head_dim'})")
        if arch == "gemma2" and not config.get("tie_word_embeddings", True):
            found.append("the output head is not tied to the embedding; llama.cpp's gemma2 always uses "
                         "token_embd.weight as the output")
        return found

    return problems


def _gemma2_hparams(writer, config: dict) -> None:
    shared_hparams(writer, config)
    if head_dim(config) == config["hidden_size"] // config["num_attention_heads"]:  # else written above
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_attn_logit_softcapping(config.get("attn_logit_softcapping") or 0.0)
    writer.add_final_logit_softcapping(config.get("final_logit_softcapping") or 0.0)
    writer.add_sliding_window(config.get("sliding_window") or 4096)
    _swa_pattern(writer, config, "gemma2")


def _gemma3_hparams(writer, config: dict) -> None:
    shared_hparams(writer, config)
    if head_dim(config) == config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    local_theta = config.get("rope_local_base_freq") or rope_theta(config, "sliding_attention")
    writer.add_rope_freq_base_swa(float(local_theta))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if any(t == "sliding_attention" for t in config.get("layer_types") or ["sliding_attention"]):
        writer.add_sliding_window(config.get("sliding_window") or 4096)
    _swa_pattern(writer, config, "gemma3")


def _gemma3_problems(config: dict) -> list[str]:
    found = _gemma_problems("gemma3")(config)
    if config.get("attn_logit_softcapping"):
        found.append("attn_logit_softcapping is set; llama.cpp's gemma3 has no attention softcapping")
    return found


_GEMMA_KEYS = (gguf.Keys.Attention.KEY_LENGTH, gguf.Keys.Attention.VALUE_LENGTH, gguf.Keys.Attention.SLIDING_WINDOW)
GEMMA2 = Architecture("gemma2", _gemma2_hparams, transform=_gemma_transform, problems=_gemma_problems("gemma2"),
                      skip=lambda config, key: _skipped(config, key) or key == "lm_head.weight",
                      required_keys=_GEMMA_KEYS + (gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING,
                                                   gguf.Keys.LLM.ATTN_LOGIT_SOFTCAPPING))
GEMMA3 = Architecture("gemma3", _gemma3_hparams, transform=_gemma_transform, problems=_gemma3_problems,
                      required_keys=_GEMMA_KEYS[:2] + (gguf.Keys.Rope.FREQ_BASE_SWA,))

# A Gemma 3 folder saved from Gemma3ForConditionalGeneration (4B and larger are published so) holds
# the same language model under language_model.* beside a vision tower. Its text model is written,
# as llama.cpp's converter does; the vision tower and projector go into llama.cpp's separate mmproj
# file, which this export does not write (images are not read by the GGUF file alone).

_VISION = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def _gemma3_text_config(config: dict) -> dict:
    return {**config, **config.get("text_config", {}), "model_type": "gemma3_text"}


def _gemma3_text_key(key: str) -> str | None:
    if _VISION.match(key):
        return None
    if key.startswith("language_model."):  # as saved: language_model.model.layers.0..., language_model.lm_head
        return key[len("language_model."):]
    if key.startswith("model.language_model."):  # transformers 5's module names
        return "model." + key[len("model.language_model."):]
    return key


GEMMA3_MULTIMODAL = replace(GEMMA3, text_config=_gemma3_text_config, rename=_gemma3_text_key)

# ---------------------------------------------------------------- Phi-3
# The checkpoint already holds what llama.cpp wants: fused qkv_proj (attn_qkv) and gate_up_proj
# (ffn_up, gate rows first), rotate-half RoPE (llama.cpp's NEOX mode, no permutation). LongRoPE
# models carry their long and short frequency factors as two tensors; llama.cpp picks the long ones
# when the context is longer than original_max_position_embeddings.

def _phi3_original_context(config: dict) -> int:
    return int(rope_parameters(config).get("original_max_position_embeddings")
               or config.get("original_max_position_embeddings") or config.get("max_position_embeddings", 4096))


def _phi3_rope_dims(config: dict) -> int:
    partial = rope_parameters(config).get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
    return int(partial * config["hidden_size"]) // config["num_attention_heads"]


def _phi3_hparams(writer, config: dict) -> None:
    shared_hparams(writer, config, handled_rope=("longrope", "su"))
    writer.add_rope_scaling_orig_ctx_len(_phi3_original_context(config))
    writer.add_rope_dimension_count(_phi3_rope_dims(config))
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: what the converter writes for none
    if _rope_type(config) in ("longrope", "su"):
        params = rope_parameters(config)
        scale = config.get("max_position_embeddings", 4096) / _phi3_original_context(config)
        default = math.sqrt(1 + math.log(scale) / math.log(_phi3_original_context(config))) if scale > 1 else 1.0
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_attn_factors(float(params.get("attention_factor") or default))


def _phi3_extra(config: dict) -> dict[str, torch.Tensor]:
    if _rope_type(config) not in ("longrope", "su"):
        return {}
    params = rope_parameters(config)
    return {"rope_factors_long.weight": torch.tensor(params["long_factor"], dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(params["short_factor"], dtype=torch.float32)}


def _phi3_problems(config: dict) -> list[str]:
    found = []
    if head_dim(config) != config["hidden_size"] // config["num_attention_heads"]:
        found.append(f"head_dim {head_dim(config)} is not hidden_size/num_attention_heads; llama.cpp's phi3 "
                     "assumes it is")
    if _rope_type(config) in ("longrope", "su"):
        params, half = rope_parameters(config), _phi3_rope_dims(config) // 2
        for name in ("long_factor", "short_factor"):
            if len(params.get(name) or []) != half:
                found.append(f"rope {name} has {len(params.get(name) or [])} values; llama.cpp needs {half} "
                             "(rotary dimensions / 2)")
    elif _rope_type(config) not in (None, "default"):
        found.append(f"rope scaling {_rope_type(config)!r}: llama.cpp's phi3 reads only LongRoPE factors")
    return found


PHI3 = Architecture("phi3", _phi3_hparams, extra_tensors=_phi3_extra, problems=_phi3_problems,
                    required_keys=(gguf.Keys.Rope.DIMENSION_COUNT,))

# ---------------------------------------------------------------- Hugging Face model_type -> family

ARCHITECTURES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3, "gemma2": GEMMA2,
                 "gemma3_text": GEMMA3, "gemma3": GEMMA3_MULTIMODAL, "phi3": PHI3}
