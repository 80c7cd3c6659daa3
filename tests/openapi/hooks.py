"""schemathesis hooks for the OpenAPI test: generated bodies name this server's model (else
every one is a 404 before the body is looked at) and ask for few tokens (the tiny model
decodes them in milliseconds; OpenAI's schema allows replies of any length)."""

from __future__ import annotations

from typing import Any

import schemathesis

MODEL = "tiny-q4_k_m"


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = MODEL
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 8:
                body[key] = 8
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 8
    return body
