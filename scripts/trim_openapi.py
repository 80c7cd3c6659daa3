"""Trim OpenAI's OpenAPI description (openai/openai-openapi, `openapi.json`) to the operations
`starling serve` implements, with every component they reach, for the schemathesis test.

    python scripts/trim_openapi.py path/to/openapi.json tests/openapi/openai-trimmed.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

OPERATIONS = {
    "/chat/completions": ["post"],
    "/completions": ["post"],
    "/models": ["get"],
    "/models/{model}": ["get"],
}


def refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/"):
            found.add(ref)
        for value in node.values():
            found |= refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= refs(value)
    return found


def trim(spec: dict[str, Any]) -> dict[str, Any]:
    paths = {
        path: {method: spec["paths"][path][method] for method in methods}
        for path, methods in OPERATIONS.items()
    }
    wanted: set[str] = set()
    todo = refs(paths)
    while todo:
        ref = todo.pop()
        if ref in wanted:
            continue
        wanted.add(ref)
        _, _, kind, name = ref.split("/", 3)
        todo |= refs(spec["components"][kind][name]) - wanted
    components: dict[str, dict[str, Any]] = {}
    for ref in sorted(wanted):
        _, _, kind, name = ref.split("/", 3)
        components.setdefault(kind, {})[name] = spec["components"][kind][name]
    if "securitySchemes" in spec.get("components", {}):
        components["securitySchemes"] = spec["components"]["securitySchemes"]
    return {
        "openapi": spec["openapi"],
        "info": {**spec["info"], "description": "Trimmed to what starling serve implements."},
        "servers": [{"url": "http://127.0.0.1:8000/v1"}],
        "paths": paths,
        "components": components,
    }


if __name__ == "__main__":
    source, target = sys.argv[1], sys.argv[2]
    with open(source, encoding="utf-8") as fh:
        spec = json.load(fh)
    with open(target, "w", encoding="utf-8") as fh:
        json.dump(trim(spec), fh, indent=1, sort_keys=False)
        fh.write("\n")
