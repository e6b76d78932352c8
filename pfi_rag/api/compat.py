"""OpenAI's conventions on the OpenAI routes (``/v1/chat/completions``, ``/v1/models``) only.

Errors there look like OpenAI's, ``{"error": {"message", "type", "param", "code"}}``, and a
request OpenAI would call invalid gets 400 (never 422), so OpenAI clients and scanners read
them as they read OpenAI's; every other route keeps the product's ``{"error": {"type",
"message"}}``.
"""

from __future__ import annotations

import re
from typing import Any

OPENAI_PREFIXES = ("/v1/chat/completions", "/v1/models")

# The product's error type -> OpenAI's code for it (others keep the product's type as code).
CODES = {
    "validation_error": "invalid_value",
    "prompt_too_long": "context_length_exceeded",
    "unauthorized": "invalid_api_key",
    "body_too_large": "request_too_large",
    "rate_limited": "rate_limit_exceeded",
}
_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")  # "stop: at most 4 ..." names its param


_CONFIG_KEY = re.compile(r"\s*\((?:serving|retrieval|models|probes)\.\w+\)")


def public_message(message: str) -> str:
    """A message without this server's config keys (a client cannot change them; scanners trip on
    them), in OpenAI's parameter names."""
    return _CONFIG_KEY.sub("", message).replace("max_new_tokens", "max_tokens")


def is_openai_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PREFIXES)


def openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error(
    status: int, error_type: str, message: str, param: str | None = None
) -> tuple[int, dict[str, Any]]:
    """(status, body) in OpenAI's shape for a product error."""
    if param is None:
        found = _PARAM.match(message)
        param = found.group(1) if found else None
    status = 400 if status == 422 else status
    body = {
        "error": {
            "message": public_message(message),
            "type": openai_type(status),
            "param": param,
            "code": CODES.get(error_type, error_type),
        }
    }
    return status, body
