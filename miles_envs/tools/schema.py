"""From a Python signature to a pydantic arguments model and the JSON schema the model is shown.

pydantic does the type work (``Literal``, enums, nested models, defaults, ``Annotated[..., Field]``);
this module only adapts its output to what chat templates and small models read best: every
``$ref`` inlined and the auto-generated ``title`` keys dropped.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

# Keys whose values are data, not sub-schemas: never rewritten.
_DATA_KEYS = frozenset({"default", "enum", "const", "examples"})
# Keys whose values map names to sub-schemas.
_NAMED_SCHEMA_KEYS = frozenset({"properties", "$defs", "patternProperties"})
_RECEIVER_NAMES = frozenset({"self", "cls"})


class ToolDefinitionError(TypeError):
    """A function cannot be turned into a tool (raised when the tool is defined, never at run time)."""


def tool_parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    """The parameters the model fills in: all but a leading ``self``/``cls`` of a method."""
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in _RECEIVER_NAMES:
        params = params[1:]
    return params


def arguments_model(fn: Callable[..., Any], name: str, descriptions: Mapping[str, str]) -> type[BaseModel]:
    """A pydantic model whose fields are ``fn``'s parameters; unknown arguments are rejected."""
    hints = typing.get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for param in tool_parameters(fn):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolDefinitionError(
                f"tool {name!r}: *{param.name} / **{param.name} cannot be described by a JSON schema; "
                "declare each argument explicitly"
            )
        if param.name not in hints:
            raise ToolDefinitionError(
                f"tool {name!r}: parameter {param.name!r} has no type hint; add one so the model knows what to pass"
            )
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], Field(default, description=descriptions.get(param.name)))
    return create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)


def json_schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The model's JSON schema with ``$ref``s inlined and generated titles removed."""
    raw = model.model_json_schema()
    definitions = raw.get("$defs", {})
    return _strip_titles(_inline_refs(raw, definitions, name, ()))


def _inline_refs(node: Any, definitions: dict[str, Any], name: str, stack: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline_refs(item, definitions, name, stack) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = node["$ref"].rsplit("/", 1)[-1]
        if target in stack:
            raise ToolDefinitionError(f"tool {name!r}: recursive type {target!r} cannot be inlined into a tool schema")
        inlined = _inline_refs(definitions[target], definitions, name, (*stack, target))
        siblings = {key: value for key, value in node.items() if key != "$ref"}
        return {**inlined, **_inline_refs(siblings, definitions, name, stack)}
    return {
        key: value if key in _DATA_KEYS else _inline_refs(value, definitions, name, stack)
        for key, value in node.items()
        if key != "$defs"
    }


def _strip_titles(node: Any) -> Any:
    if isinstance(node, list):
        return [_strip_titles(item) for item in node]
    if not isinstance(node, dict):
        return node
    stripped: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _DATA_KEYS:
            stripped[key] = value
        elif key in _NAMED_SCHEMA_KEYS:
            stripped[key] = {field: _strip_titles(schema) for field, schema in value.items()}
        else:
            stripped[key] = _strip_titles(value)
    return stripped
