"""Trainer state in a checkpoint: optimizer, LR scheduler, fp16 loss scale, RNG states and
trainer_state.json, serialised to bytes without pickle and restored in place.

Tensors go to safetensors files, everything else to JSON: ``_encode`` walks an optimizer's state
dict, moves every tensor into ``optimizer.safetensors`` and leaves ``{"__tensor__": key}`` in
``optimizer.json`` (tuples and dicts with non-string keys are tagged so they come back as they were).
What JSON cannot hold is refused for the optimizer and skipped for the scheduler (LambdaLR keeps
functions; the caller rebuilds them). The fp16 loss scale is ``scaler_state``'s ``scaler.json``.

``checkpoint.folder.save_checkpoint`` writes the files ``state_files`` returns next to the adapter;
``checkpoint.folder.load_checkpoint`` calls ``restore_state`` once the adapter weights are in place.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from qlora_lite.checkpoint.scaler import SCALER_JSON, load_scaler, scaler_json_bytes
from qlora_lite.errors import CheckpointError, ScalerStateError
from qlora_lite.storage.durable import json_bytes, load_tensors, read_json, safetensors_bytes

OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
SCHEDULER_JSON, TRAINER_STATE = "scheduler.json", "trainer_state.json"
RNG_TENSORS, RNG_JSON = "rng.safetensors", "rng.json"


def _encode(obj, key: str, tensors: dict | None):
    """JSON-able form of a state dict value; tensors go to ``tensors[key]`` (a copy, never shared storage).

    Tuples and dicts with non-string keys get a tag so they come back as they were. Raises TypeError for
    anything else (a lambda, a custom object): such values are never pickled.
    """
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise TypeError(f"{key} is a tensor")
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int, float, bool)):
                raise TypeError(f"{key} has a {type(k).__name__} key")
        return {"__dict__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    raise TypeError(f"{key} is a {type(obj).__name__}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of ``_encode``."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def capture_rng_state() -> dict:
    """The RNG states of this process: torch CPU (and CUDA), Python ``random``, NumPy.

    Returns:
        ``{"torch": uint8 tensor, "cuda": [uint8 tensor per device], "python": list, "numpy": list|None}``.
    """
    state = {"torch": torch.get_rng_state(), "cuda": [], "python": None, "numpy": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    try:
        import numpy as np  # noqa: PLC0415 (numpy is optional: without it there is no numpy RNG to save)

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def restore_rng_state(state: dict) -> None:
    """Set the RNGs from ``capture_rng_state()`` output (or what ``load_checkpoint`` read back)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices, this machine has "
                          f"{torch.cuda.device_count()}; CUDA random streams (dropout on GPU) will differ", stacklevel=2)
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if state.get("python"):
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy"):
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def state_files(optimizer, scheduler, trainer_state: dict, scaler=None) -> dict[str, bytes]:
    """Serialise everything except the adapter into ``{file name: bytes}`` (done before touching disk).

    Args:
        optimizer, scheduler: torch or bitsandbytes optimizer and an LR scheduler (either may be None).
        trainer_state: JSON-able dict. scaler: the fp16 gradient scaler or None.

    Raises:
        CheckpointError: the optimizer state or trainer_state holds something JSON cannot store.
    """
    files: dict[str, bytes] = {}
    if (scaler_bytes := scaler_json_bytes(scaler)) is not None:  # fp16 runs: the loss scale goes on from here
        files[SCALER_JSON] = scaler_bytes
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        try:
            encoded = _encode(optimizer.state_dict(), "optimizer", tensors)
        except TypeError as e:
            raise CheckpointError(f"cannot save the state of {type(optimizer).__name__}: {e}, which cannot be "
                                  "stored without pickle") from None
        files[OPTIMIZER_TENSORS] = safetensors_bytes(tensors)
        files[OPTIMIZER_JSON] = json_bytes({"class": type(optimizer).__name__, "state_dict": encoded})
    if scheduler is not None:
        kept, skipped = {}, []
        for k, v in scheduler.state_dict().items():
            try:  # LambdaLR keeps functions here: not serialisable without pickle, and rebuilt by the caller
                kept[k] = _encode(v, k, None)
                json.dumps(kept[k])
            except (TypeError, ValueError):
                kept.pop(k, None)
                skipped.append(k)
        files[SCHEDULER_JSON] = json_bytes({"class": type(scheduler).__name__, "state": kept, "skipped": skipped})
    rng = capture_rng_state()
    rng_tensors = {"torch": rng["torch"], **{f"cuda.{i}": s for i, s in enumerate(rng["cuda"])}}
    files[RNG_TENSORS] = safetensors_bytes({k: v.cpu().contiguous() for k, v in rng_tensors.items()})
    files[RNG_JSON] = json_bytes({"python": rng["python"], "numpy": rng["numpy"], "cuda_devices": len(rng["cuda"])})
    try:
        files[TRAINER_STATE] = json_bytes(trainer_state)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"trainer_state is not JSON-serialisable ({e}); keep plain numbers, strings, "
                              "lists and dicts in it") from None
    return files


def _restore_optimizer(path: Path, optimizer) -> None:
    """Load ``optimizer.safetensors`` + ``optimizer.json`` into ``optimizer`` (same class or its paged twin)."""
    if not (path / OPTIMIZER_JSON).is_file():
        raise CheckpointError(f"{path / OPTIMIZER_JSON}: missing (checkpoint saved without optimizer state)")
    saved = read_json(path / OPTIMIZER_JSON)
    # Paged and plain twins keep the same state (paged ones fall back to plain off CUDA).
    if str(saved.get("class")).removeprefix("Paged") != type(optimizer).__name__.removeprefix("Paged"):
        raise CheckpointError(f"{path / OPTIMIZER_JSON}: state of {saved.get('class')}, but the run uses "
                              f"{type(optimizer).__name__}; restore the original --optimizer")
    state_dict = _decode(saved["state_dict"], load_tensors(path / OPTIMIZER_TENSORS))
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path / OPTIMIZER_JSON}: does not fit this optimizer ({e})") from None


def _load_scaler(path: Path, scaler) -> None:
    """Restore the fp16 loss scale; a checkpoint written before it was saved only warns."""
    try:
        restored = load_scaler(path, scaler)
    except ScalerStateError as e:
        raise CheckpointError(str(e)) from None
    if not restored:
        warnings.warn(f"{path} holds no fp16 loss scale (written by an older qlora-lite or a run without fp16); "
                      f"the scale restarts at {scaler.get_scale():g}, so the first resumed steps may be skipped "
                      "while it backs off", stacklevel=4)  # load_checkpoint's caller


def restore_state(path: Path, optimizer=None, scheduler=None, scaler=None) -> None:
    """Restore optimizer, scheduler, fp16 loss scale (each when given) and the RNG states from a
    verified checkpoint folder, in place.

    Raises:
        CheckpointError: one line naming the bad file (missing, damaged, or state of another optimizer).
    """
    if optimizer is not None:
        _restore_optimizer(path, optimizer)
    if scheduler is not None and (path / SCHEDULER_JSON).is_file():
        saved = read_json(path / SCHEDULER_JSON)
        current = scheduler.state_dict()  # supplies entries that were not serialisable (LambdaLR functions)
        scheduler.load_state_dict({**current, **_decode(saved["state"], {})})
    if scaler is not None:
        _load_scaler(path, scaler)
    rng = read_json(path / RNG_JSON)
    tensors = load_tensors(path / RNG_TENSORS)
    restore_rng_state({"torch": tensors["torch"], "python": rng.get("python"), "numpy": rng.get("numpy"),
                       "cuda": [tensors[f"cuda.{i}"] for i in range(rng.get("cuda_devices", 0))]})
