"""Tool definitions as prompt text, the one rendering every API shares.

A request's tools are shown to the model as text at the start of the system prompt (Anthropic's
cache order: tools, system, messages), so a checkpoint on a tool (cache_control / cachePoint)
marks the end of that tool's line. The OpenAI chat path, which Anthropic's and Bedrock's APIs go
through, adds a line saying how to call them and finds the calls in the answer (tool_calls.py):

    You can use the following tools.
    Tool: {"description": "...", "input_schema": {...}, "name": "get_weather"}
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_HEADER = "You can use the following tools.\n"


def tool_line(name: str, description: str, input_schema: dict[str, Any]) -> str:
    spec = {"name": name, "description": description, "input_schema": input_schema}
    return "Tool: " + json.dumps(spec, ensure_ascii=False, sort_keys=True) + "\n"
