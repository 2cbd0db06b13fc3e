"""Crash-safe, resumable training checkpoints: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint is ``OUTPUT/checkpoint-{step}/`` holding the adapter (PEFT layout), the optimizer state
(``optimizer.safetensors`` + ``optimizer.json``), ``scheduler.json``, the RNG states (``rng.safetensors``
+ ``rng.json``), ``trainer_state.json`` and, in fp16 runs, the loss scale (``scaler.json``). It is
written into ``checkpoint-{step}.tmp``, every file and the folder are fsynced, the folder is renamed, and only then the ``COMPLETE`` marker (a manifest
of file sizes) is written. A folder without the marker is never used, so a kill at any moment leaves
either the previous checkpoints or a complete new one. Rotation deletes old checkpoints marker-first.

Resume compatibility (``check_resume_compatible``): settings that change which examples form which
step, or the shape/meaning of the trained weights, are refused (dataset, batch size, grad accum,
seed, model, bits/quantization, LoRA rank/alpha/targets/dtype, max_seq_len, packing, data format,
process count, optimizer); settings that only change the future of the run warn (lr, schedule,
max_steps/epochs, save/eval/logging steps, dropout, clipping, weight decay).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import warnings
from pathlib import Path

import torch
from torch import nn

from .adapter import CONFIG_NAME, RECORD_NAME, WEIGHTS_NAME, AdapterError, read_adapter, save_adapter
from .lora import lora_layers

COMPLETE_MARKER = "COMPLETE"
FORMAT_VERSION = 1
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
SCHEDULER_JSON, TRAINER_STATE = "scheduler.json", "trainer_state.json"
RNG_TENSORS, RNG_JSON = "rng.safetensors", "rng.json"
# Testing hook: "STEP:PHASE" SIGKILLs this process inside the write of checkpoint-STEP, at PHASE one of
# written (files in .tmp, not renamed), renamed (no marker yet), complete, rotating (old marker gone).
CRASH_ENV = "QLORA_LITE_CRASH_AT"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^checkpoint-\d+(\.tmp)?$")
# Names a qlora-lite run may write at the top of its output folder (guard_output_dir accepts them).
RUN_FILES = {CONFIG_NAME, WEIGHTS_NAME, RECORD_NAME, "metrics.jsonl", "config.yaml", "loss.png", "README.md",
             "train.log", "eval.json", "eval_results.json", TRAINER_STATE, "run.json", "fingerprint.json"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or resumed from; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------- writing

def _fsync_dir(path: Path) -> None:
    """Persist a folder's entries (new names, renames); not possible on Windows, where it is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot fsync folders
            raise
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` with plain ``os.write`` calls and fsync: short writes and ENOSPC surface as OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written == 0:  # a regular file only stops accepting bytes when the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1).encode()


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


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
        import numpy as np

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
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _checkpoint_files(model: nn.Module, optimizer, scheduler, trainer_state: dict, scaler=None) -> dict[str, bytes]:
    """Serialise everything except the adapter into ``{file name: bytes}`` (done before touching disk)."""
    from .scaler_state import SCALER_JSON, scaler_json_bytes

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
        files[OPTIMIZER_TENSORS] = _safetensors_bytes(tensors)
        files[OPTIMIZER_JSON] = _json_bytes({"class": type(optimizer).__name__, "state_dict": encoded})
    if scheduler is not None:
        kept, skipped = {}, []
        for k, v in scheduler.state_dict().items():
            try:  # LambdaLR keeps functions here: not serialisable without pickle, and rebuilt by the caller
                kept[k] = _encode(v, k, None)
                json.dumps(kept[k])
            except (TypeError, ValueError):
                kept.pop(k, None)
                skipped.append(k)
        files[SCHEDULER_JSON] = _json_bytes({"class": type(scheduler).__name__, "state": kept, "skipped": skipped})
    rng = capture_rng_state()
    rng_tensors = {"torch": rng["torch"], **{f"cuda.{i}": s for i, s in enumerate(rng["cuda"])}}
    files[RNG_TENSORS] = _safetensors_bytes({k: v.cpu().contiguous() for k, v in rng_tensors.items()})
    files[RNG_JSON] = _json_bytes({"python": rng["python"], "numpy": rng["numpy"], "cuda_devices": len(rng["cuda"])})
    try:
        files[TRAINER_STATE] = _json_bytes(trainer_state)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"trainer_state is not JSON-serialisable ({e}); keep plain numbers, strings, "
                              "lists and dicts in it") from None
    return files


def _check_finite(model: nn.Module, step: int) -> None:
    for name, layer in lora_layers(model).items():
        for part in (layer.lora_A.weight, layer.lora_B.weight):
            if not torch.isfinite(part).all():
                raise CheckpointError(f"refusing to save checkpoint-{step}: LoRA weights of {name} hold NaN or "
                                      "inf values; the run diverged (lower --lr, or resume from the last checkpoint)")


def _crash_point(step: int, phase: str) -> None:
    if os.environ.get(CRASH_ENV) == f"{step}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def _remove_checkpoint(path: Path, crash_step: int | None = None) -> None:
    """Delete a checkpoint folder marker-first, so a kill midway leaves an incomplete (ignored) folder."""
    marker = path / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        _fsync_dir(path)
    if crash_step is not None:
        _crash_point(crash_step, "rotating")
    shutil.rmtree(path)


def _write_folder(tmp: Path, model: nn.Module, files: dict[str, bytes], where: list) -> dict[str, int]:
    """Write the adapter and ``files`` into a fresh ``tmp`` folder, fsync every file and the folder.

    Returns:
        The manifest ``{file name: size}`` for the marker. ``where[0]`` tracks the path being written.
    """
    if tmp.exists():  # left by a run killed while writing
        shutil.rmtree(tmp)
    tmp.mkdir()
    where[0] = tmp / WEIGHTS_NAME
    save_adapter(model, tmp)
    for name, data in files.items():
        where[0] = tmp / name
        _write_bytes(where[0], data)
    for leftover in tmp.glob("*.tmp"):
        leftover.unlink()
    manifest = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    for name in manifest:  # save_adapter fsyncs its own files; do it again so every file is covered
        where[0] = tmp / name
        fd = os.open(where[0], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    where[0] = tmp
    _fsync_dir(tmp)
    return manifest


def save_checkpoint(output_dir, step: int, model: nn.Module, optimizer, scheduler, trainer_state: dict,
                    total_limit: int = 0, scaler=None) -> Path:
    """Write ``output_dir/checkpoint-{step}/`` atomically, then rotate old checkpoints.

    Args:
        step: optimizer steps done so far (the folder name).
        model: a LoRA-injected model; its adapter is saved in the PEFT layout.
        optimizer, scheduler: torch or bitsandbytes optimizer and an LR scheduler (either may be None).
        trainer_state: JSON-able dict (step, epoch, position, fingerprint, loss history, ...).
        total_limit: keep only the newest N complete checkpoints (0 keeps all); the newest is never removed.
        scaler: the fp16 gradient scaler (``accelerator.scaler``) or None; saved as ``scaler.json``.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: a write failed (disk full, permissions: names the file and the OS error; the
            half-written folder is removed and older checkpoints are untouched), non-finite LoRA weights,
            or a trainer_state that is not JSON-able.
    """
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.tmp"
    _check_finite(model, step)
    files = _checkpoint_files(model, optimizer, scheduler, trainer_state, scaler)
    where = [tmp]  # the path being written, for the error message
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        manifest = _write_folder(tmp, model, files, where)
        _crash_point(step, "written")
        where[0] = final
        if final.exists():  # an incomplete folder from a killed run, or a checkpoint of this step redone
            _remove_checkpoint(final)
        os.rename(tmp, final)
        _fsync_dir(output_dir)
        _crash_point(step, "renamed")
        where[0] = final / COMPLETE_MARKER
        _write_bytes(final / (COMPLETE_MARKER + ".tmp"), _json_bytes(
            {"format": FORMAT_VERSION, "step": step, "files": manifest}))
        os.replace(final / (COMPLETE_MARKER + ".tmp"), where[0])
        _fsync_dir(final)
    except (OSError, AdapterError, _safetensors_error()) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and not (final / COMPLETE_MARKER).exists():
            shutil.rmtree(final, ignore_errors=True)
        reason = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
        raise CheckpointError(f"cannot write checkpoint {where[0]}: {reason}; older checkpoints in {output_dir} "
                              "are intact (free disk space, then resume with --resume)") from None
    _crash_point(step, "complete")
    rotate_checkpoints(output_dir, total_limit, keep=final, _crash_step=step)
    return final


def _safetensors_error() -> type:
    from safetensors import SafetensorError

    return SafetensorError


def rotate_checkpoints(output_dir, total_limit: int, keep: Path | None = None, _crash_step=None) -> list[Path]:
    """Delete all but the newest ``total_limit`` complete checkpoints (0 keeps all) plus leftovers.

    ``keep`` (the checkpoint just written) always survives, and so does the newest complete one.
    Returns the deleted folders. A failure to delete only warns: training goes on.
    """
    output_dir = Path(output_dir)
    complete = list_checkpoints(output_dir)
    keep_set = {keep} if keep is not None else set()
    if total_limit > 0:
        others = [c for c in complete if c not in keep_set]
        keep_set |= set(others[max(0, len(others) - (total_limit - len(keep_set))):])
    else:
        keep_set |= set(complete)
    if complete:
        keep_set.add(complete[-1])
    doomed = [c for c in complete if c not in keep_set]
    doomed += [p for p in output_dir.iterdir() if p.is_dir() and _LEFTOVER.match(p.name)
               and p not in complete and p not in keep_set]
    for path in doomed:
        try:
            _remove_checkpoint(path, _crash_step)
        except OSError as e:
            warnings.warn(f"could not delete old checkpoint {path}: {e.strerror or e}", stacklevel=2)
    return doomed


# ---------------------------------------------------------------------------------------------- reading

def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoint folders (marker present) in ``output_dir``, oldest to newest by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name))
             and p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def _check_safetensors(path: Path) -> None:
    """The header parses and the data section ends exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or n > size - 8:
            raise CheckpointError(f"{path}: damaged safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: damaged safetensors header (not valid JSON)") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or padded safetensors file ({size} bytes, header says {8 + n + end})")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        what = "empty" if path.stat().st_size == 0 else f"not valid JSON ({e})"
        raise CheckpointError(f"{path}: {what}") from None


def verify_checkpoint(path) -> dict:
    """Check a checkpoint without loading tensors: marker, every file present with its recorded size,
    JSON files parse, safetensors headers intact. Returns the marker's manifest.

    Raises:
        CheckpointError: one line naming the first bad file.
    """
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: not complete (no {COMPLETE_MARKER} marker; it was being written when the "
                              "run stopped)")
    manifest = _read_json(marker)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not {WEIGHTS_NAME, CONFIG_NAME, TRAINER_STATE} <= set(files):
        raise CheckpointError(f"{marker}: damaged marker (no file manifest)")
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file}: {actual} bytes, expected {size} (truncated or overwritten)")
        if name.endswith(".json"):
            _read_json(file)
        elif name.endswith(".safetensors"):
            _check_safetensors(file)
    return manifest


def latest_checkpoint(output_dir, verify: bool = True) -> Path | None:
    """The newest complete checkpoint that passes ``verify_checkpoint``; a damaged one is skipped with a
    warning naming the bad file. None when there is none."""
    candidates = list_checkpoints(output_dir)
    for i in range(len(candidates) - 1, -1, -1):
        if not verify:
            return candidates[i]
        try:
            verify_checkpoint(candidates[i])
            return candidates[i]
        except CheckpointError as e:
            fallback = candidates[i - 1].name if i else "none left: starting from scratch is the only option"
            warnings.warn(f"skipping damaged checkpoint: {e}; falling back to {fallback}", stacklevel=2)
    return None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(path.read_bytes())  # bytes, not a mapping: nothing keeps the file open
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _load_adapter_weights(path: Path, model: nn.Module) -> None:
    try:
        _, modules, _ = read_adapter(path)
    except AdapterError as e:
        raise CheckpointError(str(e).splitlines()[0]) from None
    layers = lora_layers(model)
    missing, extra = sorted(set(layers) - set(modules)), sorted(set(modules) - set(layers))
    if missing or extra:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: LoRA layers differ from the model (checkpoint lacks "
                              f"{missing[:3]}, has extra {extra[:3]}); were --target-modules changed?")
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                target, saved = getattr(layer, part).weight, modules[name][part]
                if target.shape != saved.shape:
                    raise CheckpointError(f"{path / WEIGHTS_NAME}: {name}.{part} has shape {tuple(saved.shape)}, "
                                          f"the model {tuple(target.shape)}; was --rank changed?")
                target.copy_(saved)


def read_trainer_state(path) -> dict:
    """Verify a checkpoint and return its trainer_state without loading any tensor (for checking a
    resume with ``check_resume_compatible`` before the model is touched).

    Raises:
        CheckpointError: as ``verify_checkpoint``.
    """
    verify_checkpoint(path)
    return _read_json(Path(path) / TRAINER_STATE)


def _load_scaler(path: Path, scaler) -> None:
    """Restore the fp16 loss scale; a checkpoint written before it was saved only warns."""
    from .scaler_state import ScalerStateError, load_scaler

    try:
        restored = load_scaler(path, scaler)
    except ScalerStateError as e:
        raise CheckpointError(str(e)) from None
    if not restored:
        warnings.warn(f"{path} holds no fp16 loss scale (written by an older qlora-lite or a run without fp16); "
                      f"the scale restarts at {scaler.get_scale():g}, so the first resumed steps may be skipped "
                      "while it backs off", stacklevel=3)


def load_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, scaler=None) -> dict:
    """Restore LoRA weights (in place, so optimizer references stay valid), optimizer, scheduler,
    gradient scaler (``scaler``, fp16 runs) and RNG states from a checkpoint folder.

    Returns:
        The saved trainer_state dict.

    Raises:
        CheckpointError: one line naming the bad file (not complete, missing, truncated, damaged,
            or not fitting this model/optimizer).
    """
    path = Path(path)
    verify_checkpoint(path)
    _load_adapter_weights(path, model)
    if optimizer is not None:
        if not (path / OPTIMIZER_JSON).is_file():
            raise CheckpointError(f"{path / OPTIMIZER_JSON}: missing (checkpoint saved without optimizer state)")
        saved = _read_json(path / OPTIMIZER_JSON)
        # Paged and plain twins keep the same state (paged ones fall back to plain off CUDA).
        if str(saved.get("class")).removeprefix("Paged") != type(optimizer).__name__.removeprefix("Paged"):
            raise CheckpointError(f"{path / OPTIMIZER_JSON}: state of {saved.get('class')}, but the run uses "
                                  f"{type(optimizer).__name__}; restore the original --optimizer")
        state_dict = _decode(saved["state_dict"], _load_tensors(path / OPTIMIZER_TENSORS))
        try:
            optimizer.load_state_dict(state_dict)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path / OPTIMIZER_JSON}: does not fit this optimizer ({e})") from None
    if scheduler is not None and (path / SCHEDULER_JSON).is_file():
        saved = _read_json(path / SCHEDULER_JSON)
        current = scheduler.state_dict()  # supplies entries that were not serialisable (LambdaLR functions)
        scheduler.load_state_dict({**current, **_decode(saved["state"], {})})
    if scaler is not None:
        _load_scaler(path, scaler)
    rng = _read_json(path / RNG_JSON)
    tensors = _load_tensors(path / RNG_TENSORS)
    restore_rng_state({"torch": tensors["torch"], "python": rng.get("python"), "numpy": rng.get("numpy"),
                       "cuda": [tensors[f"cuda.{i}"] for i in range(rng.get("cuda_devices", 0))]})
    return _read_json(path / TRAINER_STATE)


# ---------------------------------------------------------------------------------------------- resuming

# fingerprint key -> (what the user reads, refused?). Refused: the saved state cannot continue the
# same run (other data order, other step contents, other weight shapes/meaning). Others only warn.
FINGERPRINT_KEYS: dict[str, tuple[str, bool]] = {
    "dataset_sha256": ("dataset", True), "eval_fraction": ("eval fraction (changes the training split)", True),
    "format": ("data format", True), "max_seq_len": ("max seq len", True), "packing": ("packing", True),
    "drop_long": ("drop long", True), "train_on_inputs": ("train on inputs", True),
    "batch_size": ("batch size", True), "grad_accum": ("grad accum", True), "seed": ("seed", True),
    "num_processes": ("number of processes", True), "model": ("base model", True), "bits": ("bits", True),
    "quant_type": ("quant type", True), "double_quant": ("double quant", True),
    "compute_dtype": ("compute dtype", False), "rank": ("LoRA rank", True), "alpha": ("LoRA alpha", True),
    "rslora": ("rsLoRA", True), "target_modules": ("target modules", True), "lora_dtype": ("LoRA dtype", True),
    "adapter": ("starting adapter", True), "optimizer": ("optimizer", True),
    "lr": ("learning rate", False), "lr_scheduler": ("lr scheduler", False), "warmup_steps": ("warmup steps", False),
    "weight_decay": ("weight decay", False), "max_grad_norm": ("max grad norm", False),
    "max_steps": ("max steps", False), "epochs": ("epochs", False), "save_steps": ("save steps", False),
    "eval_steps": ("eval steps", False), "save_total_limit": ("save total limit", False),
    "logging_steps": ("logging steps", False), "dropout": ("LoRA dropout", False),
    "gradient_checkpointing": ("gradient checkpointing", False), "eval_data": ("eval data", False),
    "examples_per_epoch": ("examples per epoch", True),
}
# Spreading the same global batch (batch size x processes x grad accum) differently trains each step
# on the same examples with the same loss (train.epoch_batches), so all three may change together.
_LAYOUT_KEYS = ("batch_size", "num_processes", "grad_accum")


def global_batch(fingerprint: dict) -> int:
    """Sequences per optimizer step over all processes."""
    return fingerprint["batch_size"] * fingerprint.get("num_processes", 1) * fingerprint.get("grad_accum", 1)


def _relaid_keys(saved: dict, current: dict) -> set[str]:
    """The process-layout keys whose change is allowed: the global batch and the epoch stay the same."""
    if "batch_size" not in saved or "batch_size" not in current:
        return set()
    same = (global_batch(saved) == global_batch(current)
            and saved.get("examples_per_epoch") == current.get("examples_per_epoch"))
    return set(_LAYOUT_KEYS) if same else set()


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (datasets can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_fingerprint(settings: dict, dataset_sha256: str, **extra) -> dict:
    """The fingerprint of a run: every known key found in ``settings`` (a flat dict, or a nested
    ``Config.to_dict()``), the dataset hash, and ``extra`` entries."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    fingerprint = {k: flat[k] for k in FINGERPRINT_KEYS if k in flat}
    return {**fingerprint, "dataset_sha256": dataset_sha256, **extra}


def _show(key: str, value) -> str:
    return str(value)[:12] if key.endswith("sha256") and value else repr(value) if isinstance(value, str) else str(value)


def check_resume_compatible(saved_state: dict, fingerprint: dict) -> list[str]:
    """Compare the fingerprint saved in a checkpoint with the current run's.

    Args:
        saved_state: the checkpoint's trainer_state (its ``"fingerprint"`` entry is used) or a fingerprint.
        fingerprint: the current run's (see ``make_fingerprint``).

    Returns:
        Warnings for allowed changes ("learning rate changed 0.0002 -> 0.0001 ...").

    Raises:
        CheckpointError: naming every refused change, and what to do.
    """
    saved = saved_state.get("fingerprint", saved_state)
    refused, warned = [], []
    relaid = _relaid_keys(saved, fingerprint)
    for key in sorted(set(saved) & set(fingerprint), key=lambda k: list(FINGERPRINT_KEYS).index(k)
                      if k in FINGERPRINT_KEYS else len(FINGERPRINT_KEYS)):
        old, new = saved[key], fingerprint[key]
        if old == new:
            continue
        label, refuse = FINGERPRINT_KEYS.get(key, (key.replace("_", " "), False))
        refuse = refuse and key not in relaid
        if key.endswith("sha256"):
            (refused if refuse else warned).append(f"{label} changed (sha256 {_show(key, old)} -> {_show(key, new)})")
        else:
            (refused if refuse else warned).append(f"{label} changed {_show(key, old)} -> {_show(key, new)}")
    if refused:
        layout = saved.get("num_processes", 1) != fingerprint.get("num_processes", 1)
        raise CheckpointError("cannot resume: " + ", ".join(refused) +
                              "; start a new --output or restore the original settings" +
                              (" (another number of processes may resume when --batch-size x processes x "
                               "--grad-accum stays the same)" if layout else ""))
    return [w + " (allowed on resume)" for w in warned]


def guard_output_dir(output_dir, model_dir, resume: bool) -> None:
    """Refuse an output folder that would harm the user's files or mix two runs. Never deletes anything.

    Raises:
        CheckpointError: --output equals or lies inside the model folder; the folder holds files
            qlora-lite did not write; or it holds a previous run and ``resume`` is false.
    """
    out = Path(output_dir).expanduser().resolve()
    if model_dir and Path(model_dir).expanduser().is_dir():
        model = Path(model_dir).expanduser().resolve()
        if out == model or model in out.parents:
            raise CheckpointError(f"--output {output_dir} is inside the model folder {model_dir}; writing there "
                                  "would mix training files into the model; choose a folder outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"--output {output_dir} is a file, not a folder; choose a folder path")
    entries = sorted(out.iterdir())
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries
               if not (p.name in RUN_FILES or _LEFTOVER.match(p.name) or p.name.endswith(".tmp"))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(f"--output {output_dir} holds files qlora-lite did not write ({shown}); "
                              "choose an empty or new folder (nothing was deleted)")
    if entries and not resume:
        shown = ", ".join(p.name for p in entries[:4])
        raise CheckpointError(f"--output {output_dir} already holds a qlora-lite run ({shown}); pass --resume to "
                              "continue it, or choose another --output")
