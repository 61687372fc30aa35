"""One line for a config's first validation error: the key path, the value and what is allowed (train/config.py
raises it as ConfigError)."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel

# Keys that moved: naming the new place beats listing the allowed keys.
MOVED_KEYS = {"model.param_dtype": "precision.params", "model.dtype": "precision.compute",
              "model.logits_dtype": "precision.logits", "model.grad_dtype": "precision.grads"}


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class behind a field's annotation (`X` or `X | None`), None for a plain value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def describe_error(error: dict[str, Any], root: type[BaseModel]) -> str:
    # A key holding a newline or another unprintable character is shown escaped: the message stays one line.
    path = ".".join(p if not isinstance(p, str) or p.isprintable() else repr(p) for p in map(str, error["loc"]))
    if error["type"] == "extra_forbidden":
        if path in MOVED_KEYS:
            return f"{path} is now {MOVED_KEYS[path]} (the precision policy has one place: the precision section)"
        section: type[BaseModel] | None = root
        for part in error["loc"][:-1]:
            if isinstance(part, str) and section is not None:
                section = section_model(section.model_fields[part].annotation)
        allowed = ", ".join(section.model_fields) if section is not None else "see `tessera config keys`"
        return f"unknown config key {path}; allowed keys here: {allowed}"
    if error["type"] == "missing":
        return f"{path} is required here and has no default"
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # a validator's own message, which names its keys
        return msg if not path or msg.startswith(f"{path}.") else f"{path}: {msg}"
    return f"{path}={error['input']!r} is not allowed: {msg}"
