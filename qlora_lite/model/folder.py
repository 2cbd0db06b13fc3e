"""A model folder: where ``--model`` points (a local folder, the bundled demo, a hub id), its files
checked before anything heavy loads (JSON, safetensors headers, custom code, the architecture), its
weight files read tensor by tensor, and its tokenizer."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import transformers
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# ModelLoadError lives with the folder checks; every caller still imports it from here
from qlora_lite.config import DEMO_MODEL
from qlora_lite.errors import ModelLoadError, SafetensorsError
from qlora_lite.storage.durable import read_json_object
from qlora_lite.storage.safetensors_io import iter_tensors, read_headers

# The JSON files of a model folder that something here reads; each is parsed up front, so a damaged
# one is reported with its line before minutes of loading.
_FOLDER_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "model.safetensors.index.json")

def check_folder_json(model_dir: Path) -> None:
    """Parse each JSON file of ``model_dir`` that something reads; raise ModelLoadError on the first bad one."""
    for name in _FOLDER_JSON:
        if (model_dir / name).exists():
            read_json_file(model_dir / name)


def read_json_file(path: Path) -> dict:
    """A JSON object from a file of a model folder.

    Raises:
        ModelLoadError: the file is not valid JSON (with FILE:LINE:COLUMN) or not an object.
    """
    return read_json_object(path, ModelLoadError, "fix the file, or copy it from the original model again")


def read_model_config(model_dir: Path, trust_remote_code: bool = False):
    """config.json as a transformers config, refusing what transformers would answer with a traceback.

    Raises:
        ModelLoadError: invalid JSON, an unknown model type, or custom code without --trust-remote-code.
    """
    path = model_dir / "config.json"
    raw = read_json_file(path)
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if raw.get("auto_map") and not trust_remote_code:
            raise ModelLoadError(
                f"{path}: model type {model_type!r} is defined by Python code inside the model folder "
                f"(auto_map), which qlora-lite does not run by default. Read that code; if you trust it, pass "
                "--trust-remote-code")
        if model_type is None:
            raise ModelLoadError(f"{path} has no model_type (e.g. \"llama\"); copy config.json from the original "
                                 "model again")
        if not raw.get("auto_map"):
            raise ModelLoadError(
                f"{path}: model type {model_type!r} is unknown to transformers {transformers.__version__}; check "
                "model_type in that file, or upgrade transformers (pip install -U transformers)")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: transformers cannot read this config ({str(e).splitlines()[0]})") from None


def check_headers(files: list[Path]) -> None:
    """Read every shard's header before the model is built: a damaged file is named before any load."""
    try:
        read_headers(files)
    except (SafetensorsError, OSError) as e:
        raise ModelLoadError(f"cannot read the model weights: {e}; copy or download that file again") from None


def load_bin(path: Path) -> dict:
    """A pickle-based .bin checkpoint through torch's restricted unpickler (``weights_only=True``).

    Raises:
        ModelLoadError: the file holds more than tensors. torch's own message advises retrying with
            weights_only=False, which would run whatever code the file carries; it is never repeated.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol 4 detected": noise beside the refusal
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        raise ModelLoadError(
            f"{path}: refused to load: this pickle file holds more than plain tensors (it may run code when "
            "loaded) or is damaged. Do not load it some other way unless you know where it came from; get the "
            f"model as safetensors instead ({type(e).__name__})") from None


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


def resolve_model_dir(model_path: str | Path) -> Path:
    """A local folder as given, ``demo`` for the bundled demo model, or a hub id (needs network)."""
    path = Path(model_path).expanduser()
    if str(model_path) == "demo" and not path.exists():
        path = DEMO_MODEL
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder: config.json is missing")
        check_folder_json(path)  # a damaged file is named now, not as a traceback after the weights load
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass the model folder that holds config.json")
    if str(model_path).count("/") == 1 and not str(model_path).startswith((".", "/", "~")):
        try:
            return Path(snapshot_download(str(model_path), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                        "*.txt", "*.jinja"]))
        except Exception as e:
            raise ModelLoadError(f"{model_path}: not a local folder and the hub download failed ({e})") from e
    raise ModelLoadError(f"model folder {path} does not exist")


def load_tokenizer(model_path: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token guaranteed (the EOS token when the model has none)."""
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
