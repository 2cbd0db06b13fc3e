"""Records as they come -> the fields our formats read: ``--field-map`` renames, ShareGPT -> chat messages.

``--field-map output=answer,instruction=question`` reads the field ``answer`` as ``output`` (and so on),
for data whose columns have other names (``config.parse_field_map`` turns the flag into the dict used here). A ShareGPT record (``conversations`` of ``{"from":
"human" | "gpt" | "system", "value": str}``) becomes a chat record with ``messages``.
"""

from __future__ import annotations

import difflib

from qlora_lite.data.formats import type_name

# ShareGPT speaker -> chat role.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def apply_field_map(record: dict, field_map: dict[str, str]) -> dict:
    """``record`` with each mapped column under its target name (the column's own name is dropped)."""
    if not field_map:
        return record
    sources = set(field_map.values())
    out = {k: v for k, v in record.items() if k not in sources}
    for target, source in field_map.items():
        if source in record:
            out[target] = record[source]
        else:
            out.pop(target, None)  # a same-named field is not what the user asked for
    return out


def explain_mapped(reason: str, record: dict, field_map: dict[str, str]) -> str:
    """A validation ``reason`` about a mapped field, saying which column it came from (or that it is missing)."""
    for target, source in field_map.items():
        if f"'{target}'" in reason:
            got = f"from column '{source}'" if source in record else f"the record has no column '{source}'"
            reason += f" (--field-map {target}={source}: {got})"
    return reason


def sharegpt_messages(conversations) -> tuple[list[dict] | None, str | None]:
    """ShareGPT turns -> chat messages, or ``(None, reason)`` naming the first bad turn."""
    if not isinstance(conversations, list) or not conversations:
        return None, "field 'conversations' must be a non-empty list of {from, value} objects"
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            return None, f"conversations[{i}] must be an object with 'from' and 'value', got {type_name(turn)}"
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                what = "missing" if key not in turn else f"must be a string, got {type_name(turn[key])}"
                return None, f"conversations[{i}].{key} {what}"
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            close = difflib.get_close_matches(turn["from"].lower(), SHAREGPT_ROLES, 1)
            return None, (f"conversations[{i}].from {turn['from']!r} is not one of {', '.join(SHAREGPT_ROLES)}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
        messages.append({"role": role, "content": turn["value"]})
    return messages, None


def normalize_record(record: dict, field_map: dict[str, str]) -> tuple[dict, str | None]:
    """Apply the field map, then turn a ShareGPT record into a chat one.

    Returns:
        ``(record, None)``, or ``(record, reason)`` when the ShareGPT turns are malformed.
    """
    record = apply_field_map(record, field_map)
    if "conversations" in record and "messages" not in record:
        messages, reason = sharegpt_messages(record["conversations"])
        if reason is not None:
            return record, reason
        record = {k: v for k, v in record.items() if k != "conversations"}
        record["messages"] = messages
    return record, None
