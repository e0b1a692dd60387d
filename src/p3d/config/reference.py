"""Render docs/config.md from the schema: every key, its type, default and one-line doc.

    python -m p3d.config.reference > docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from enum import Enum

from p3d.config import schema

SECTIONS = {
    "model": "ModelConfig",
    "parallel": "ParallelConfig",
    "data": "DataConfig",
    "optim": "OptimConfig",
    "train": "TrainConfig",
    "eval": "EvalConfig",
    "checkpoint": "CheckpointConfig",
    "logging": "LoggingConfig",
    "run": "RunConfig",
    "dist": "DistConfig",
}


def field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field: the comment on its line}} read from schema.py's source."""
    source = inspect.getsource(schema)
    lines = source.splitlines()
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    line = lines[item.lineno - 1]
                    docs[node.name][item.target.id] = line.split("  # ", 1)[1].strip() if "  # " in line else ""
    return docs


def _type_name(annotation: str) -> str:
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        return f"{_type_name(annotation[len('Optional['):-1])} or null"
    enum = getattr(schema, annotation, None)
    if isinstance(enum, type) and issubclass(enum, Enum):
        return " \\| ".join(member.value for member in enum)
    return annotation


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, Enum):
        return value.value
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def render() -> str:
    docs = field_docs()
    out = [
        "# Config reference",
        "",
        "Generated from `src/p3d/config/schema.py` by `python -m p3d.config.reference` (a test keeps it in sync).",
        "Override any key on the command line as `section.key=value`; pick presets with `section=name`",
        "(`p3d ls` lists them) and whole experiments with `+recipe=name`. Unknown keys (also with `+key=`)",
        "and values of the wrong type fail when the config is composed; a number outside the range in its",
        "type column, or a float that is not finite, fails validation. `model.config.*` takes any field of",
        "the Hugging Face config; its sizes (layers, hidden size, heads, vocabulary, ...) must be >= 1.",
        "",
    ]
    for section, class_name in SECTIONS.items():
        cls = getattr(schema, class_name)
        out += [f"## `{section}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += _rows(section, cls, docs)
        out.append("")
    return "\n".join(out)


def _rows(prefix: str, cls: type, docs: dict[str, dict[str, str]]) -> list[str]:
    """One row per field; a list of dataclasses (data.sources) also gets a row per item field (`data.sources[].path`)."""
    rows = []
    for field in dataclasses.fields(cls):
        annotation = field.type if isinstance(field.type, str) else str(field.type)
        bounds = schema.bounds_of(field)
        allowed = f", {bounds.describe()}" if bounds else ""
        rows.append(f"| `{prefix}.{field.name}` | {_type_name(annotation)}{allowed} | `{_default(field)}` | {docs[cls.__name__][field.name]} |")
        item = getattr(schema, annotation[len("List["):-1], None) if annotation.startswith("List[") else None
        if item is not None and dataclasses.is_dataclass(item):
            rows += _rows(f"{prefix}.{field.name}[]", item, docs)
    return rows


if __name__ == "__main__":
    print(render())
