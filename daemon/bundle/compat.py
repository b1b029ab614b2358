"""Schema compatibility between the release a topic is served by and a candidate bundle.

The rule, deliberately simple (top-level properties only):

* **input**: every property the new input schema *requires* must be *declared* (listed under
  ``properties``) by the current input schema. Otherwise the topic may carry records without
  it, and the new bundle would reject them.
* **output**: every property the current output schema *requires* must still be *required* by
  the new output schema. Otherwise consumers of the output topic may stop receiving a field
  they rely on.
"""

from __future__ import annotations

from typing import Any


def _required(schema: dict[str, Any]) -> set[str]:
    req = schema.get("required") if isinstance(schema, dict) else None
    return {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()


def _declared(schema: dict[str, Any]) -> set[str]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    return set(props) if isinstance(props, dict) else set()


def incompatibilities(current_input: dict[str, Any], current_output: dict[str, Any], new_input: dict[str, Any], new_output: dict[str, Any]) -> list[str]:
    """One line per rule the new schemas break (empty: compatible)."""
    problems = []
    undeclared = sorted(_required(new_input) - _declared(current_input))
    if undeclared:
        problems.append("input schema requires " + ", ".join(undeclared)
                        + ", which the current input schema does not declare (records on the topic may lack them)")
    dropped = sorted(_required(current_output) - _required(new_output))
    if dropped:
        problems.append("output schema no longer requires " + ", ".join(dropped)
                        + ", which the current output schema requires (downstream consumers rely on them)")
    return problems
