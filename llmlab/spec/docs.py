"""docs/spec.md, generated from the spec's JSON Schema: one table per block, every field's description.

    llmlab schema --markdown > docs/spec.md       # regenerate (a test fails when the file is stale)

The schema is `llmlab.spec.load.json_schema()`, the same one editors read, and the field
descriptions are the ones the wizard asks with: one source for all three. Never imports torch.
"""

from __future__ import annotations

import json
from typing import Any

from llmlab.spec.load import json_schema

HEADER = """# The pipeline spec

Every field of a pipeline YAML file, block by block. Generated from the spec's JSON Schema by
`llmlab schema --markdown > docs/spec.md`; `llmlab schema` prints the schema itself, for editors.
A stage's block is chosen by its `kind`; an optimizer's by its `name`.
"""


FIRST = ("kind", "name", "from", "model", "tokenizer", "data", "train")  # fields a reader looks for first in a block


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(node: dict[str, Any]) -> str:
    """A field's type in words: `int`, `list of DataSource`, `"a" | "b"`, `TrainSpec or none`."""
    if "$ref" in node:
        return f"[{_ref_name(node['$ref'])}](#{_ref_name(node['$ref']).lower()})"
    if "const" in node:
        return json.dumps(node["const"])
    if "enum" in node:
        return " | ".join(json.dumps(v) for v in node["enum"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            parts = [_type(n) for n in node[key]]
            none = "none" in parts
            parts = [p for p in parts if p != "none"]
            return " or ".join(parts) + (" or none" if none else "")
    kind = node.get("type")
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    if kind == "object":
        extra = node.get("additionalProperties")
        return f"map of {_type(extra)}" if isinstance(extra, dict) else "map"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "none"}.get(kind, "any")


def _bounds(node: dict[str, Any]) -> str:
    marks = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<", "minItems": "items >=",
             "minProperties": "entries >="}
    found = [f"{op} {node[key]}" for key, op in marks.items() if key in node]
    for alternative in node.get("anyOf", []):
        found += [f"{op} {alternative[key]}" for key, op in marks.items() if key in alternative]
    if "pattern" in node:
        found.append(f"matches `{node['pattern']}`")
    return ", ".join(found)


def _default(node: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in node:  # a default built per instance: an empty list or map, or a block's own defaults
        kind = node.get("type")
        return "`[]`" if kind == "array" else "`{}`" if kind == "object" else "its fields' defaults"
    value = node["default"]
    return "none" if value is None else f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _block(name: str, node: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    if node.get("description"):
        lines += [" ".join(node["description"].split()), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    required = set(node.get("required", []))
    fields = node.get("properties", {})
    first = [f for f in FIRST if f in fields]
    for field, spec in [(f, fields[f]) for f in first] + [(f, v) for f, v in fields.items() if f not in first]:
        bounds = _bounds(spec)
        described = spec.get("description", "") + (f" ({bounds})" if bounds else "")
        lines.append(f"| `{field}` | {_cell(_type(spec))} | {_cell(_default(spec, field in required))} | {_cell(described)} |")
    return lines + [""]


def _order(schema: dict[str, Any]) -> list[str]:
    """The blocks in the order a reader meets them: breadth-first from the pipeline."""
    defs = schema.get("$defs", {})
    seen: list[str] = []
    queue = [schema]
    while queue:
        node = queue.pop(0)
        for ref in _refs(node):
            if ref not in seen and ref in defs:
                seen.append(ref)
                queue.append(defs[ref])
    return seen + sorted(set(defs) - set(seen))


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [_ref_name(node["$ref"])] if "$ref" in node else []
        return own + [r for key, value in node.items() if key != "$defs" for r in _refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def spec_markdown() -> str:
    """The whole of docs/spec.md."""
    schema = json_schema()
    lines = [HEADER, *_block(schema.get("title", "Pipeline"), schema)]
    for name in _order(schema):
        lines += _block(name, schema["$defs"][name])
    return "\n".join(lines).rstrip() + "\n"
