"""Adapter files in the PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key names and config fields are the ones PEFT writes, so PEFT (and vLLM and other PEFT readers) load
our adapters unchanged, and we load theirs. What the adapter was trained against (base, bits, quant
type, vocabulary) goes into ``qlora_lite.json`` beside them, a file PEFT ignores.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from qlora_lite.errors import AdapterError
from qlora_lite.model.lora import LoRALinear, lora_layers, mark_only_lora_trainable
from qlora_lite.storage.durable import read_json_object, save_safetensors_atomic, write_json_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
RECORD_NAME = "qlora_lite.json"
PEFT_PREFIX = "base_model.model."
# lora_A/lora_B weights (PEFT may put the adapter name before ``.weight``) and DoRA's magnitudes
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?:(?P<part>lora_[AB])(?:\.[^.]+)?\.weight"
                  r"|(?P<magnitude>lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$")


def training_record(model: nn.Module) -> dict:
    """What the adapter is trained against, taken from a model loaded by ``model.loading.load_base_model``."""
    quant = dict(getattr(model, "qlora_quant", {}))
    dtype = quant.pop("compute_dtype", None)
    return {
        "base_model": quant.pop("path", None),
        **quant,
        "compute_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "model_type": model.config.model_type,
        "vocab_size": model.get_input_embeddings().weight.shape[0],
    }


def save_adapter(model: nn.Module, output_dir: str | Path, base_model_name: str | None = None) -> Path:
    """Write the model's LoRA weights and config in the PEFT layout; returns the folder.

    Raises:
        AdapterError: the model has no LoRA layers, or they differ in hyper-parameters we cannot
            express (PEFT records one dropout and one rsLoRA flag for the whole adapter).
    """
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(layers.values()))
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.use_dora:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        if layer.rank != first.rank:
            rank_pattern[name] = layer.rank
        if layer.alpha != first.alpha:
            alpha_pattern[name] = layer.alpha
    if len({layer.rslora for layer in layers.values()}) > 1:
        raise AdapterError("LoRA layers mix rsLoRA and plain scaling; PEFT's format holds one setting")
    if len({layer.use_dora for layer in layers.values()}) > 1:
        raise AdapterError("LoRA layers mix DoRA and plain LoRA; PEFT's format holds one setting")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    record = training_record(model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or record.get("base_model"),
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "use_rslora": first.rslora,
        "fan_in_fan_out": first.fan_in_fan_out,
        "bias": "none",
        "modules_to_save": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": first.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    save_safetensors_atomic(tensors, output_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json_atomic(output_dir / CONFIG_NAME, config)
    write_json_atomic(output_dir / RECORD_NAME, record)
    return output_dir


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict | None]:
    """Read an adapter folder (ours or PEFT's).

    Returns:
        ``(config, {module_name: {"lora_A": A, "lora_B": B}}, record_or_None)``.

    Raises:
        AdapterError: missing files, unsupported PEFT features, damaged files (naming the file).
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.exists():
            hint = " (.bin adapters are pickle files; re-save them as safetensors)" if path == weights_path and (
                adapter_dir / "adapter_model.bin").exists() else ""
            raise AdapterError(f"{path} is missing: not an adapter folder{hint}")
    config = _read_json(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')} is not supported (only LORA)")
    unsupported = [k for k in ("modules_to_save",) if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']}")
    if unsupported:
        raise AdapterError(f"{config_path}: unsupported adapter features: {', '.join(unsupported)}")
    try:
        flat = load_file(str(weights_path))
    except Exception as e:  # safetensors raises several error types for damaged files
        raise AdapterError(f"{weights_path}: cannot read safetensors file ({e})") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA linear weight (embedding LoRA and "
                               "trained biases are not supported)")
        modules.setdefault(match["module"], {})[match["part"] or match["magnitude"]] = tensor
    dora = bool(config.get("use_dora"))
    expected = {"lora_A", "lora_B", "lora_magnitude_vector"} if dora else {"lora_A", "lora_B"}
    for name, parts in modules.items():
        if set(parts) != expected:
            missing = ", ".join(sorted(expected - set(parts))) or "nothing"
            extra = ", ".join(sorted(set(parts) - expected)) or "nothing"
            raise AdapterError(f"{weights_path}: module {name} lacks {missing} and has {extra} extra "
                               f"(use_dora is {str(dora).lower()} in {CONFIG_NAME})")
        _check_rank(name, parts, config, config_path)
        for part, tensor in parts.items():  # a NaN adapter would score nan and exit 0
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{weights_path}: {name}.{part} holds NaN or infinite values (the training run "
                                   "diverged or the file is damaged); use an earlier checkpoint-STEP/ folder of "
                                   "the run instead")
    record_path = adapter_dir / RECORD_NAME
    record = _read_json(record_path) if record_path.exists() else None
    return config, modules, record


def _read_json(path: Path) -> dict:
    """A JSON object from an adapter file, or AdapterError naming FILE:LINE:COLUMN."""
    return read_json_object(path, AdapterError, "fix the file, or copy the adapter folder again from where it was trained")


def _check_rank(name: str, parts: dict[str, torch.Tensor], config: dict, config_path: Path) -> None:
    """The rank the config gives a module (``rank_pattern`` or ``r``) must be the rank of its tensors:
    PEFT builds layers from the config, so a mismatch loads there with an error or wrong scaling."""
    a, b = parts["lora_A"], parts["lora_B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{config_path.parent / WEIGHTS_NAME}: {name} has lora_A {tuple(a.shape)} and lora_B "
                           f"{tuple(b.shape)}, which do not form a rank-r pair; the file is damaged")
    pattern = config.get("rank_pattern") or {}
    expected = next((r for p, r in pattern.items() if name == p or name.endswith("." + p)), config.get("r"))
    if expected is not None and expected != a.shape[0]:
        raise AdapterError(f"{config_path}: r is {expected} for {name} but its tensors have rank {a.shape[0]}; the "
                           "config and the weights are from different adapters: copy both files from the same run "
                           "(or set r / rank_pattern to the tensors' rank)")


def check_compatible(record: dict | None, model: nn.Module, adapter_dir: str | Path) -> None:
    """Refuse a base whose vocabulary or architecture differs from the one the adapter was trained on."""
    if not record:
        return
    vocab = model.get_input_embeddings().weight.shape[0]
    problems = []
    if record.get("vocab_size") not in (None, vocab):
        problems.append(f"vocab size {record['vocab_size']} (adapter) vs {vocab} (base)")
    if record.get("model_type") not in (None, model.config.model_type):
        problems.append(f"model type {record['model_type']} (adapter) vs {model.config.model_type} (base)")
    if problems:
        raise AdapterError(
            f"{adapter_dir} was trained on a different base ({record.get('base_model')}): " + "; ".join(problems)
        )


def layer_alpha(config: dict, name: str, rank: int) -> float:
    """The alpha of layer ``name`` in a PEFT ``adapter_config.json``: its ``alpha_pattern`` entry (a
    pattern names the layer or a suffix of it), else ``lora_alpha``, else the rank (PEFT's default)."""
    pattern = config.get("alpha_pattern") or {}
    hit = next((a for p, a in pattern.items() if name == p or name.endswith("." + p)), None)
    return float(hit if hit is not None else config.get("lora_alpha", rank))


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False,
                 dtype: torch.dtype | None = None, dropout: float | None = None) -> list[str]:
    """Wrap the layers named in the adapter with LoRALinear and load its weights, in place.

    Rank comes from each tensor's shape (so PEFT's ``rank_pattern`` is honoured), alpha from
    ``alpha_pattern`` or ``lora_alpha``.

    Args:
        dropout: the LoRA dropout of the run that goes on training the adapter (``--dropout``); None
            keeps the file's ``lora_dropout``.
        dtype: dtype of the loaded A and B; None keeps the file's (exact values: PEFT saves fp32 by
            default). Training passes its LoRA dtype, so an fp32 adapter trains like a fresh bf16 one.

    Returns:
        The names of the wrapped layers.
    """
    config, modules, record = read_adapter(adapter_dir)
    check_compatible(record, model, adapter_dir)
    known = dict(model.named_modules())
    new_dtype = dtype or next(iter(modules.values()))["lora_A"].dtype
    for name, parts in modules.items():
        base = known.get(name)
        if base is None:
            raise AdapterError(f"{adapter_dir}: the adapter targets {name}, which the base model does not have")
        rank = parts["lora_A"].shape[0]
        alpha = layer_alpha(config, name, rank)
        dora = bool(config.get("use_dora"))
        layer = base if isinstance(base, LoRALinear) else LoRALinear(
            base, rank, alpha, config.get("lora_dropout", 0.0) if dropout is None else dropout,
            config.get("use_rslora", False), new_dtype, dora)
        if dora and parts["lora_magnitude_vector"].shape != (layer.out_features,):
            raise AdapterError(f"{adapter_dir}: the DoRA magnitudes of {name} have shape "
                               f"{tuple(parts['lora_magnitude_vector'].shape)}, the layer {layer.out_features} outputs")
        if (layer.lora_A.weight.shape, layer.lora_B.weight.shape) != (parts["lora_A"].shape, parts["lora_B"].shape):
            raise AdapterError(f"{adapter_dir}: shapes of {name} do not fit the base layer "
                               f"({tuple(parts['lora_B'].shape)} x {tuple(parts['lora_A'].shape)})")
        if dtype is not None:  # a layer wrapped before keeps its dtype unless one is asked for
            layer.lora_A.to(dtype)
            layer.lora_B.to(dtype)
        with torch.no_grad():
            layer.lora_A.weight.copy_(parts["lora_A"])
            layer.lora_B.weight.copy_(parts["lora_B"])
            if dora:
                magnitude = parts["lora_magnitude_vector"]
                layer.lora_magnitude_vector = nn.Parameter(magnitude.float().clone())  # fp32, as a fresh layer's
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    if trainable:
        mark_only_lora_trainable(model)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return list(modules)
