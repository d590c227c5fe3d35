import enum
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from miles_envs.tools import Tool, ToolArgumentError, ToolDefinitionError, tool


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Place(BaseModel):
    city: str
    title: str | None = None  # a field named like the JSON-schema keyword must survive title stripping


def test_spec_from_hints_docstring_defaults_literal_enum_and_model():
    @tool
    def forecast(
        place: Place,
        unit: Unit = Unit.CELSIUS,
        when: Literal["today", "tomorrow"] = "today",
        days: Annotated[int, Field(ge=1, le=7)] = 1,
    ) -> dict:
        """Weather forecast for a place.

        Uses the regional service.

        Args:
            place: Where to look.
            unit: Temperature unit.
        """

    assert forecast.spec == {
        "type": "function",
        "function": {
            "name": "forecast",
            "description": "Weather forecast for a place.\n\nUses the regional service.",
            "parameters": {
                "type": "object",
                "additionalProperties": False,
                "required": ["place"],
                "properties": {
                    "place": {
                        "type": "object",
                        "description": "Where to look.",
                        "required": ["city"],
                        "properties": {
                            "city": {"type": "string"},
                            "title": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
                        },
                    },
                    "unit": {
                        "type": "string",
                        "enum": ["celsius", "fahrenheit"],
                        "default": "celsius",
                        "description": "Temperature unit.",
                    },
                    "when": {"type": "string", "enum": ["today", "tomorrow"], "default": "today"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7, "default": 1},
                },
            },
        },
    }


def test_validate_returns_typed_arguments_with_defaults():
    @tool
    def pick(place: Place, unit: Unit = Unit.CELSIUS, scale: float = 1.0) -> str:
        """Pick."""

    kwargs = pick.validate('{"place": {"city": "Oslo"}, "unit": "fahrenheit", "scale": 2}')
    assert kwargs == {"place": Place(city="Oslo"), "unit": Unit.FAHRENHEIT, "scale": 2.0}
    assert pick.validate({"place": {"city": "Oslo"}})["unit"] is Unit.CELSIUS


def test_validation_follows_json_schema_semantics():
    @tool
    def add(a: int, b: int, mode: Literal["exact", "round"] = "exact") -> int:
        """Add."""

    with pytest.raises(ToolArgumentError) as caught:
        add.validate('{"a": "3", "mode": "fast", "c": 1}')
    assert str(caught.value) == (
        "'a': Input should be a valid integer (got '3'); missing required argument 'b'; "
        "'mode': Input should be 'exact' or 'round' (got 'fast'); unexpected argument 'c'"
    )
    with pytest.raises(ToolArgumentError, match=r"^arguments are not valid JSON"):
        add.validate('{"a": 1,')
    with pytest.raises(ToolArgumentError, match=r"^'arguments': Input should be an object \(got \[1, 2\]\)$"):
        add.validate("[1, 2]")


def test_methods_become_tools_bound_to_their_instance():
    class Counter:
        def __init__(self):
            self.total = 0

        @tool(name="bump", timeout=2.5)
        def increment(self, by: int) -> int:
            """Increase the counter."""
            self.total += by
            return self.total

    assert isinstance(Counter.increment, Tool)
    assert list(Counter.increment.parameters["properties"]) == ["by"]
    counter = Counter()
    bound = counter.increment
    assert (bound.name, bound.timeout) == ("bump", 2.5)
    assert bound(**bound.validate('{"by": 4}')) == 4
    assert counter.total == 4


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(x):\n    '''Doc.'''", "parameter 'x' has no type hint"),
        ("def f(*xs: int):\n    '''Doc.'''", r"\*xs / \*\*xs cannot be described"),
        ("def f(x: int): pass", "has no description"),
    ],
)
def test_definition_errors_name_the_problem(source, message):
    namespace = {}
    exec(source, namespace)
    with pytest.raises(ToolDefinitionError, match=message):
        tool(namespace["f"])


def test_recursive_models_are_rejected_at_definition():
    class Node(BaseModel):
        children: list["Node"] = []

    Node.model_rebuild()

    def walk(root: Node) -> int:
        """Walk a tree."""

    with pytest.raises(ToolDefinitionError, match="recursive type 'Node'"):
        tool(walk)
