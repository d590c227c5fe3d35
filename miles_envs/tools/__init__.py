"""Tools for tool-use environments: ``@tool`` specs, argument validation and concurrent execution."""

from miles_envs.tools.schema import ToolDefinitionError
from miles_envs.tools.tool import Tool, ToolArgumentError, tool
from miles_envs.tools.toolbox import Toolbox, render_result, tool_message, truncate

__all__ = [
    "Tool",
    "ToolArgumentError",
    "ToolDefinitionError",
    "Toolbox",
    "render_result",
    "tool",
    "tool_message",
    "truncate",
]
