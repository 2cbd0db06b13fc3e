"""Read and check the files of a model folder before anything heavy loads.

Each check turns what transformers, tokenizers, safetensors or torch would answer with a traceback
(or, for an unknown architecture, a list of ~200 config classes) into one ``ModelLoadError`` that
names the file and says what to do, and runs before the weights are read: a damaged file costs a
second, not the minutes of a load.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .errors import QloraLiteError


class ModelLoadError(QloraLiteError, RuntimeError):
    """The model folder cannot be loaded; the message says which file and why."""


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
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); fix the file or copy it "
                             "from the original model again") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: not a text file (not UTF-8); copy it from the original model again") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(value).__name__}; copy it from the "
                             "original model again")
    return value


def read_model_config(model_dir: Path, trust_remote_code: bool = False):
    """config.json as a transformers config, refusing what transformers would answer with a traceback.

    Raises:
        ModelLoadError: invalid JSON, an unknown model type, or custom code without --trust-remote-code.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

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
            import transformers

            raise ModelLoadError(
                f"{path}: model type {model_type!r} is unknown to transformers {transformers.__version__}; check "
                "model_type in that file, or upgrade transformers (pip install -U transformers)")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: transformers cannot read this config ({str(e).splitlines()[0]})") from None


def check_headers(files: list[Path]) -> None:
    """Read every shard's header before the model is built: a damaged file is named before any load."""
    from .safetensors_io import SafetensorsError, read_headers

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
    import pickle

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol 4 detected": noise beside the refusal
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        raise ModelLoadError(
            f"{path}: refused to load: this pickle file holds more than plain tensors (it may run code when "
            "loaded) or is damaged. Do not load it some other way unless you know where it came from; get the "
            f"model as safetensors instead ({type(e).__name__})") from None
