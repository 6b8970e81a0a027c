"""The config reference table of the README, generated from the schema."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

from pretrain.config.schema import Config


def reference_markdown() -> str:
    """The config reference table for the README, generated from the schema."""
    lines = ["| key | default | doc |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{key}` | `{json.dumps(default)}` | {f.metadata['doc']} |")

    walk(Config, "")
    return "\n".join(lines)


def write_readme_reference(readme: Path) -> None:
    """Replace the text between the config-reference markers of the README with the reference."""
    begin, end = "<!-- config-reference -->", "<!-- /config-reference -->"
    text = readme.read_text()
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{begin}\n{reference_markdown()}\n{end}{tail}")
