"""What the values of some flags mean: sizes (``8GiB``), ``--target-modules``, ``--field-map`` and
``--report-to``. Torch-free and below ``config`` (which validates with them), so every stage can use them.
"""

from __future__ import annotations

import re

from qlora_lite.errors import EstimateError

# Fields the data formats read, which --field-map may fill from columns of other names.
FIELD_TARGETS = ("instruction", "input", "output", "text", "messages", "conversations")

# Experiment trackers --report-to can send the metrics to (through accelerate's trackers).
TRACKERS = ("tensorboard", "wandb", "mlflow")

SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
              "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_field_map(text: str | None) -> tuple[dict[str, str], list[str]]:
    """``"output=answer,instruction=question"`` -> ``({"output": "answer", ...}, problems)``.

    Problems (one line each): an entry without ``=``, an unknown target field, a target given twice.
    """
    mapping: dict[str, str] = {}
    problems = []
    for entry in filter(None, (e.strip() for e in (text or "").split(","))):
        target, sep, source = (part.strip() for part in entry.partition("="))
        if not sep or not target or not source:
            problems.append(f"--field-map entry {entry!r} is not FIELD=COLUMN (e.g. output=answer)")
        elif target not in FIELD_TARGETS:
            problems.append(f"--field-map: {target!r} is not a field qlora-lite reads; map one of "
                            f"{', '.join(FIELD_TARGETS)} (FIELD=COLUMN, e.g. output=answer)")
        elif target in mapping:
            problems.append(f"--field-map maps {target!r} twice")
        else:
            mapping[target] = source
    return mapping, problems


def report_targets(text: str) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ``"none"`` or "" -> ``[]``."""
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    return [n for n in names if n != "none"]


def parse_size(text: str | int, bare_unit: str = "b") -> int:
    """A size in bytes: ``"8GiB"`` -> 8589934592, ``"2GB"`` -> 2000000000, ``"2G"`` -> 2147483648.

    One reader for every size the CLI takes (``estimate --budget``, ``merge --max-shard-size``).
    KB/MB/GB/TB are decimal (as transformers' ``max_shard_size``); KiB/MiB/GiB/TiB and the bare
    letters K/M/G/T are binary; case and spaces do not matter. An int is bytes.

    Args:
        bare_unit: the unit of a number written without one ("gib" for a memory budget, where
            8 bytes would never be meant; "b" for shard sizes, as transformers reads them).

    Raises:
        EstimateError: not a positive size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), "b"
    else:
        s = str(text).strip().lower().replace(" ", "")
        number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = s[len(number):] or bare_unit
        try:
            value = float(number)
        except ValueError:
            value = -1.0
    if unit not in SIZE_UNITS or not value > 0 or value == float("inf"):
        raise EstimateError(f"{text!r} is not a memory size; write e.g. 8GiB, 6GB or 512MiB")
    return int(value * SIZE_UNITS[unit])


def select_targets(names: list[str], target_modules: str | list[str]) -> tuple[list[str], list[str]]:
    """Which of ``names`` (linear layers, in order) ``--target-modules`` selects: ``all-linear``, one regex
    as PEFT stores it (full match), or a list of names matched as PEFT does (the whole name or its last
    dotted parts: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``).

    Returns:
        ``(chosen names, list entries that match none)``; the second is empty for all-linear and a regex.
    """
    if isinstance(target_modules, str):
        if target_modules.strip() == "all-linear":
            return list(names), []
        target_modules = target_modules.split(",")
    targets = [t.strip() for t in target_modules if t.strip()]
    if len(targets) == 1 and any(c in targets[0] for c in "*()|[\\"):
        return [n for n in names if re.fullmatch(targets[0], n)], []

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    return ([n for n in names if any(matches(n, t) for t in targets)],
            [t for t in targets if not any(matches(n, t) for n in names)])
