"""``@tool``: a typed Python function (sync or async) becomes an OpenAI function spec plus a validator.

The docstring's summary becomes the description and its ``Args:`` entries (Google, NumPy or reST
style) the argument descriptions. ``@tool`` also works on methods: the tool binds to the instance on
attribute access, so a ``ToolEnv`` subclass can keep per-episode state on ``self``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any, overload

import docstring_parser
from pydantic import BaseModel, ValidationError

from miles_envs.tools.schema import ToolDefinitionError, arguments_model, json_schema

_MAX_INPUT_REPR = 80


class ToolArgumentError(ValueError):
    """The model's arguments do not match the tool's schema; the message is written for the model."""


@dataclasses.dataclass(frozen=True)
class Tool:
    fn: Callable[..., Any]
    name: str
    description: str
    arguments: type[BaseModel]
    parameters: dict[str, Any]
    timeout: float | None = None

    @property
    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry for this function."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """Parse and check the arguments against the schema; returns keyword arguments for ``fn``.

        Validation is pydantic's strict JSON mode, i.e. JSON Schema semantics: ``"3"`` is not an
        integer, but ``3`` is a valid float and enum values arrive as strings.
        """
        if arguments is None or arguments == "":
            arguments = "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        try:
            parsed = self.arguments.model_validate_json(arguments, strict=True)
        except ValidationError as error:
            raise ToolArgumentError(describe_validation_error(error)) from None
        return {field: getattr(parsed, field) for field in type(parsed).model_fields}

    async def invoke(self, kwargs: Mapping[str, Any]) -> Any:
        """Run the function; a sync function runs in a worker thread so calls can overlap."""
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(**kwargs)
        return await asyncio.to_thread(self.fn, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> Tool:
        if instance is None:
            return self
        return dataclasses.replace(self, fn=self.fn.__get__(instance, owner))


def describe_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "missing":
            problems.append(f"missing required argument '{where}'")
        elif item["type"] == "extra_forbidden":
            problems.append(f"unexpected argument '{where}'")
        elif item["type"] == "json_invalid":
            problems.append(f"arguments are not valid JSON ({item['ctx']['error']})")
        else:
            shown = repr(item["input"])
            if len(shown) > _MAX_INPUT_REPR:
                shown = shown[:_MAX_INPUT_REPR] + "..."
            problems.append(f"'{where or 'arguments'}': {item['msg']} (got {shown})")
    return "; ".join(problems)


def _make_tool(fn: Callable[..., Any], name: str | None, description: str | None, timeout: float | None) -> Tool:
    if isinstance(fn, Tool):
        return fn
    name = name or fn.__name__
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    summary = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
    description = description or summary
    if not description:
        raise ToolDefinitionError(f"tool {name!r} has no description: add a docstring or pass description=")
    param_docs = {param.arg_name: param.description for param in doc.params if param.description}
    model = arguments_model(fn, name, param_docs)
    return Tool(fn, name, description, model, json_schema(model, name), timeout)


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@overload
def tool(
    *, name: str | None = None, description: str | None = None, timeout: float | None = None
) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Turn a typed function into a :class:`Tool`: ``@tool`` or ``@tool(name=..., timeout=...)``.

    ``timeout`` (seconds) overrides the executor's default for this tool.
    """
    if fn is not None:
        return _make_tool(fn, name, description, timeout)
    return lambda f: _make_tool(f, name, description, timeout)
