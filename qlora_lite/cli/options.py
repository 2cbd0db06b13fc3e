"""Click options generated from the config dataclasses, so flags, --help and YAML keys always agree."""

from __future__ import annotations

import dataclasses

import click

from qlora_lite.config import SECTIONS, field_type, option_name

# Folders and files are named alike in every command's --help (click would say TEXT).
METAVARS = {"model": "DIR", "adapter": "DIR", "output": "DIR", "data": "PATH", "eval_data": "PATH",
            "field_map": "FIELD=COLUMN,...", "report_to": "NAME,..."}


def config_options(*field_names: str):
    """Decorator adding one click option per named config field (all sections searched).

    Every option defaults to None ("not given") so a YAML file given by --config is only overridden
    by flags the user really typed; the help text shows the dataclass default instead.
    """
    fields = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}

    def decorate(func):
        for name in reversed(field_names):
            f = fields[name]
            tp = field_type(f)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            shown = (f"--{'' if default else 'no-'}{name.replace('_', '-')}") if tp is bool else default
            help_text = f.metadata["help"] + ("" if default is None else f"  [default: {shown}]")
            flag = option_name(name)
            if tp is bool:
                decl = f"{flag}/--no-{flag[2:]}"
                func = click.option(decl, name, default=None, help=help_text)(func)
                continue
            if choices:
                kind = click.Choice([str(c) for c in choices])
            else:
                kind = {int: int, float: float}.get(tp, str)
            callback = (lambda ctx, param, value: None if value is None else int(value)) if choices and tp is int else None
            func = click.option(flag, name, type=kind, default=None, help=help_text, callback=callback,
                                metavar=METAVARS.get(name))(func)
        return func

    return decorate


def with_defaults(flags: dict) -> dict:
    """``flags`` from ``config_options`` with each one the user did not give set to its config default
    (for commands that take the values directly instead of building a whole config)."""
    fields = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    return {name: fields[name].default if value is None and name in fields else value
            for name, value in flags.items()}
