"""The fp16 gradient scaler's state as JSON, so a resumed fp16 run continues with the same loss scale.

Without it a resumed run would restart the scale at its initial value (65536 by default) and skip
steps again until it has backed off, so the resumed losses would no longer equal the uninterrupted
run's. The state is five numbers (``torch.amp.GradScaler.state_dict()``); they are stored in
``scaler.json`` inside the checkpoint folder: plain JSON, never pickle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qlora_lite.errors import ScalerStateError

SCALER_JSON = "scaler.json"


# GradScaler.state_dict() keys and the Python type each must have.
_FIELDS = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int,
           "_growth_tracker": int}


def scaler_state(scaler) -> dict | None:
    """The JSON-able state of a gradient scaler, or None when there is nothing to save.

    Args:
        scaler: a ``torch.amp.GradScaler`` (or accelerate's ``accelerator.scaler``), or None.

    Returns:
        ``{"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int,
        "_growth_tracker": int}``; None for no scaler or a disabled one (it keeps no state).
    """
    if scaler is None or not scaler.is_enabled():
        return None
    state = scaler.state_dict()
    # Python floats hold a float32 scale exactly, and JSON writes floats in round-trip form.
    return {key: kind(state[key]) for key, kind in _FIELDS.items()}


def scaler_json_bytes(scaler) -> bytes | None:
    """``scaler_state`` encoded as the bytes of ``scaler.json``; None when there is nothing to save."""
    state = scaler_state(scaler)
    return None if state is None else json.dumps({"class": type(scaler).__name__, "state": state}, indent=1).encode()


def _checked_state(saved, where: str) -> dict:
    """The state dict inside ``saved`` (the parsed ``scaler.json``), its values checked.

    Raises:
        ScalerStateError: a key is missing, of the wrong type, or the scale is not a positive finite number.
    """
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise ScalerStateError(f"{where}: damaged scaler state (no \"state\" object)")
    checked = {}
    for key, kind in _FIELDS.items():
        value = state.get(key)
        # bool is an int subclass in Python, but never a valid scaler value.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ScalerStateError(f"{where}: damaged scaler state ({key} is {value!r}, expected {kind.__name__})")
        checked[key] = kind(value)
    if not (math.isfinite(checked["scale"]) and checked["scale"] > 0):
        raise ScalerStateError(f"{where}: damaged scaler state (scale {checked['scale']}, expected a positive number)")
    return checked


def restore_scaler(scaler, saved: dict, where: str | Path = SCALER_JSON) -> None:
    """Set ``scaler`` to a state written by ``scaler_json_bytes`` (already parsed from JSON).

    Args:
        scaler: the run's enabled ``torch.amp.GradScaler``.
        saved: the parsed ``scaler.json``: ``{"class": str, "state": {...}}``.
        where: the file it came from, for error messages.

    Raises:
        ScalerStateError: the saved state is damaged (names ``where``).
    """
    state = _checked_state(saved, str(where))
    scaler.load_state_dict(state)


def load_scaler(folder: str | Path, scaler) -> bool:
    """Restore ``scaler`` from ``folder/scaler.json`` when the run has an enabled scaler.

    Returns:
        False when the run has an enabled scaler but the folder holds no ``scaler.json`` (a checkpoint
        from before the scale was saved, or from a run without fp16): the scale keeps its initial
        value. True otherwise (restored, or nothing to restore).

    Raises:
        ScalerStateError: ``scaler.json`` is not valid JSON or its values are damaged (names the file).
    """
    if scaler is None or not scaler.is_enabled():
        return True
    path = Path(folder) / SCALER_JSON
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ScalerStateError(f"{path}: not valid JSON ({e})") from None
    restore_scaler(scaler, saved, path)
    return True
