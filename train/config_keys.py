"""Every config key with its type, default and description, read off the schema (train/config.py and
model/config.py), so the list is never written twice; and the schema itself as JSON, for editors."""

from __future__ import annotations

import copy
import json
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from train.config import PRECISION_PRESETS, ExperimentConfig, section_model


@dataclass(frozen=True)
class Key:
    path: str
    type: str
    default: str
    description: str


def type_name(annotation: Any) -> str:
    """A type as a config author reads it: `int`, `float | null`, `fp32 | bf16 | bf16-pure`, `list[str]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def constraints(field) -> str:
    """The bounds pydantic enforces on a field, as `>= 1`, `in (0, 1)` and the like."""
    bounds = {}
    for item in field.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{words[k]} {v}" for k, v in bounds.items())


def _default(field) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def _render(value: Any, required: bool) -> str:
    if required:
        return "(required)"
    if isinstance(value, BaseModel):
        return "(section)"
    return json.dumps(value, default=str)


def config_keys(section: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[Key]:
    """Every leaf key under `section`, depth first in schema order; optional sections (distill, model.moe)
    are listed with their keys."""
    keys = []
    for name, field in section.model_fields.items():
        path, inner = f"{prefix}{name}", section_model(field.annotation)
        if inner is not None:
            if _default(field) is None:  # an optional section: absent unless set
                keys.append(Key(path, "section | null", "null", field.description or f"the {name} section"))
            keys += config_keys(inner, f"{path}.")
            continue
        bounds = constraints(field)
        keys.append(Key(path, type_name(field.annotation) + (f" ({bounds})" if bounds else ""),
                        _render(_default(field), field.is_required()), field.description or ""))
    return keys


def json_schema() -> str:
    """The JSON schema of what a CONFIG file may hold (what YAML language servers validate against): a recipe
    (or a run's config.yaml), whose `model` is a preset's name, `{preset: NAME, <model keys>}` or model keys;
    or a bare model preset (model keys, and the name of the precision policy it recommends)."""
    recipe = ExperimentConfig.model_json_schema()
    defs = recipe.pop("$defs")
    model = copy.deepcopy(defs["ModelConfig"])
    model["properties"]["preset"] = {"type": "string", "description": "a model preset to start from: NAME or a path"}
    defs["ModelSection"] = {**model, "title": "ModelSection"}
    recipe["properties"]["model"] = {
        "anyOf": [{"type": "string", "description": "a model preset: NAME (configs/models/NAME.yaml) or a path"},
                  {"$ref": "#/$defs/ModelSection"}],
    }
    preset = copy.deepcopy(defs["ModelConfig"])
    preset["properties"]["precision"] = {
        "enum": list(PRECISION_PRESETS), "description": "the precision policy this model is usually trained with",
    }
    defs["Recipe"], defs["ModelPreset"] = {**recipe, "title": "Recipe"}, {**preset, "title": "ModelPreset"}
    schema = {"title": "Tessera config", "anyOf": [{"$ref": "#/$defs/Recipe"}, {"$ref": "#/$defs/ModelPreset"}],
              "$defs": defs}
    return json.dumps(schema, indent=2)
