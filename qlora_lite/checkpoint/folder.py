"""Crash-safe, resumable training checkpoints: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint is ``OUTPUT/checkpoint-{step}/`` holding the adapter (PEFT layout), the optimizer state
(``optimizer.safetensors`` + ``optimizer.json``), ``scheduler.json``, the RNG states (``rng.safetensors``
+ ``rng.json``), ``trainer_state.json`` and, in fp16 runs, the loss scale (``scaler.json``). It is
written into ``checkpoint-{step}.tmp``, every file and the folder are fsynced, the folder is renamed,
and only then the ``COMPLETE`` marker (a manifest of file sizes and SHA-256 hashes) is written. A folder without the
marker is never used, so a kill at any moment leaves either the previous checkpoints or a complete
new one. Rotation deletes old checkpoints marker-first.

This module is the life of a checkpoint folder: save (atomic write, marker), rotate, list, verify,
pick the latest, load. Its parts:
  checkpoint_io      fsynced writes and reads whose errors name the bad file (CheckpointError).
  checkpoint_state   optimizer, scheduler, loss scale, RNG states and trainer_state to bytes and back.
  checkpoint_resume  whether a run may resume: fingerprints, compatibility, the output-folder guard.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from qlora_lite.checkpoint.state import TRAINER_STATE, restore_state, state_files
from qlora_lite.errors import AdapterError, CheckpointError
from qlora_lite.model.adapter import CONFIG_NAME, RECORD_NAME, WEIGHTS_NAME, read_adapter, save_adapter
from qlora_lite.model.lora import lora_layers
from qlora_lite.storage.durable import (
    check_safetensors,
    file_sha256,
    fsync_dir,
    json_bytes,
    read_json,
    safetensors_error,
    write_bytes,
)

COMPLETE_MARKER = "COMPLETE"
FORMAT_VERSION = 1


# Testing hook: "STEP:PHASE" SIGKILLs this process inside the write of checkpoint-STEP, at PHASE one of
# written (files in .tmp, not renamed), renamed (no marker yet), complete, rotating (old marker gone).
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# A checkpoint folder, complete or not (``.tmp``: being written, or left by a killed write).
CHECKPOINT_FOLDER = re.compile(r"^checkpoint-\d+(\.tmp)?$")


# Every file name a checkpoint write of ours creates (state_files' names, the adapter, the marker).
_CHECKPOINT_FILES = {WEIGHTS_NAME, CONFIG_NAME, RECORD_NAME, COMPLETE_MARKER, "optimizer.safetensors",
                     "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json", "scaler.json", TRAINER_STATE}


def _check_finite(model: nn.Module, step: int) -> None:
    for name, layer in lora_layers(model).items():
        for part in (layer.lora_A.weight, layer.lora_B.weight):
            if not torch.isfinite(part).all():
                raise CheckpointError(f"refusing to save checkpoint-{step}: LoRA weights of {name} hold NaN or "
                                      "inf values; the run diverged (lower --lr, or resume from the last checkpoint)")


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder marker-first, so a kill midway leaves an incomplete (ignored) folder."""
    marker = path / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        fsync_dir(path)
    shutil.rmtree(path)


def _refuse_foreign(path: Path) -> None:
    if not is_own_checkpoint(path):
        raise CheckpointError(f"{path} was not written by qlora-lite; it is never replaced (move it away)")


def _write_folder(tmp: Path, model: nn.Module, files: dict[str, bytes], where: list) -> dict[str, dict]:
    """Write the adapter and ``files`` into a fresh ``tmp`` folder, fsync every file and the folder.

    Returns:
        The manifest for the marker: ``files`` ``{file name: size}`` and ``sha256`` ``{file name: hex}``
        (hashed from disk, after the fsync). ``where[0]`` tracks the path being written.
    """
    if tmp.exists():  # left by a run killed while writing
        _refuse_foreign(tmp)
        shutil.rmtree(tmp)
    tmp.mkdir()
    where[0] = tmp / WEIGHTS_NAME
    save_adapter(model, tmp)
    for name, data in files.items():
        where[0] = tmp / name
        write_bytes(where[0], data)
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
    fsync_dir(tmp)
    return {"files": manifest, "sha256": {name: file_sha256(tmp / name) for name in manifest}}


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
    files = state_files(optimizer, scheduler, trainer_state, scaler)
    where = [tmp]  # the path being written, for the error message
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        manifest = _write_folder(tmp, model, files, where)
        where[0] = final
        if final.exists():  # an incomplete folder from a killed run, or a checkpoint of this step redone
            _refuse_foreign(final)
            _remove_checkpoint(final)
        os.rename(tmp, final)
        fsync_dir(output_dir)
        where[0] = final / COMPLETE_MARKER
        write_bytes(final / (COMPLETE_MARKER + ".tmp"), json_bytes(
            {"format": FORMAT_VERSION, "step": step, **manifest}))
        os.replace(final / (COMPLETE_MARKER + ".tmp"), where[0])
        fsync_dir(final)
    except (OSError, AdapterError, safetensors_error()) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and not (final / COMPLETE_MARKER).exists():
            shutil.rmtree(final, ignore_errors=True)
        reason = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
        raise CheckpointError(f"cannot write checkpoint {where[0]}: {reason}; older checkpoints in {output_dir} "
                              "are intact (free disk space, then resume with --resume)") from None
    rotate_checkpoints(output_dir, total_limit, keep=final)
    return final


def rotate_checkpoints(output_dir, total_limit: int, keep: Path | None = None) -> list[Path]:
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
    doomed += [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_FOLDER.match(p.name)
               and p not in complete and p not in keep_set and is_own_checkpoint(p)]
    for path in doomed:
        try:
            _remove_checkpoint(path)
        except OSError as e:
            warnings.warn(f"could not delete old checkpoint {path}: {e.strerror or e}", stacklevel=2)
    return doomed


def is_own_checkpoint(path: Path) -> bool:
    """Whether qlora-lite wrote this checkpoint folder: complete (our marker), or holding only files a
    checkpoint write of ours makes. Another trainer's ``checkpoint-500/`` is neither, and is never deleted."""
    if (path / COMPLETE_MARKER).is_file():
        return True
    return all(p.name in _CHECKPOINT_FILES or p.name.endswith(".tmp") for p in path.iterdir())


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoint folders (marker present) in ``output_dir``, oldest to newest by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name))
             and p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path) -> dict:
    """Check a checkpoint without loading tensors: marker, every file present with its recorded size
    and SHA-256 (markers from before the hashes have sizes only), JSON files parse, safetensors headers
    intact. Returns the marker's manifest.

    Raises:
        CheckpointError: one line naming the first bad file.
    """
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: not complete (no {COMPLETE_MARKER} marker; it was being written when the "
                              "run stopped)")
    manifest = read_json(marker)
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
        digest = (manifest.get("sha256") or {}).get(name)
        if digest is not None and file_sha256(file) != digest:
            raise CheckpointError(f"{file}: content differs from what was written (SHA-256 mismatch, same size): "
                                  "damaged on disk or edited")
        if name.endswith(".json"):
            read_json(file)
        elif name.endswith(".safetensors"):
            check_safetensors(file)
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
    return read_json(Path(path) / TRAINER_STATE)


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
    restore_state(path, optimizer, scheduler, scaler)
    return read_json(path / TRAINER_STATE)
