"""Reading a config: recipe YAML files, model presets, run directories and dotted overrides become one
validated ExperimentConfig (its schema is train/config.py).

A model preset (configs/models/NAME.yaml) holds a model's shape and may name the precision policy it is
usually trained with (`precision: bf16`); that name becomes `precision.preset` unless the recipe or an
override chose one. Nothing else about numbers lives in a preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from model.config import ModelConfig
from train import storage
from train.config import ConfigError, ExperimentConfig, build_config, first_line

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_EXPERIMENT = CONFIGS_DIR / "experiments" / "tiny.yaml"
PRESET_POLICY_KEY = "precision"  # the one key of a model preset that is not a model key
RECOMMENDED_POLICY = "_recommended_precision"  # where a tree keeps the adopted preset's policy until overrides are in

# Before the precision policy had one home, a run's config.yaml kept its dtypes in the model section.
LEGACY_MODEL_DTYPES = {"param_dtype": "params", "dtype": "compute", "logits_dtype": "logits", "grad_dtype": "grads"}


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file, or from RUN_DIR/config.yaml for a run directory."""
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path} is a directory without config.yaml, so not a run directory; pass a config YAML")
        return read_run_config(path)
    return _read_mapping(path)


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_bytes()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The config a run directory was written with, as a tree in today's schema."""
    return upgrade_saved_config(_read_mapping(run_dir / "config.yaml"))


def upgrade_saved_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A run's config.yaml in today's schema: one bias switch (`use_bias`) becomes the three it was split into;
    dtypes written in the model section move to the precision section with the same meaning (an unset optimizer
    or gradient dtype followed the parameters')."""
    model = tree.get("model")
    if isinstance(model, dict) and "use_bias" in model:
        model = {k: v for k, v in model.items() if k != "use_bias"}
        if tree["model"]["use_bias"]:
            model.update(qkv_bias=True, attention_out_bias=True, mlp_bias=True)
        tree = {**tree, "model": model}
    precision = tree.get("precision") or {}
    if not isinstance(model, dict) or not isinstance(precision, dict) or not LEGACY_MODEL_DTYPES.keys() & model.keys():
        return tree  # nothing to move (or not a mapping, which validation reports)
    model, precision = dict(model), dict(precision)
    for old, new in LEGACY_MODEL_DTYPES.items():
        value = model.pop(old, None)
        if value is not None:
            precision[new] = value
    precision["preset"] = precision.get("preset") or "fp32"
    params = precision.get("params", "float32")
    # An unset optimizer dtype was that of what the optimizer updates: the float32 master copy, if kept.
    precision["optimizer_state"] = precision.get("optimizer_state") or ("float32" if precision.get("master_weights")
                                                                           else params)
    precision["grads"] = precision.get("grads") or params
    precision["master_weights"] = bool(precision.get("master_weights"))
    return {**tree, "model": model, "precision": precision}


def is_model_preset(tree: dict[str, Any]) -> bool:
    """A bare model preset (model keys, maybe a policy name) rather than a recipe."""
    policy = tree.get(PRESET_POLICY_KEY)
    keys = set(tree) - {PRESET_POLICY_KEY}
    return bool(keys) and keys <= set(ModelConfig.model_fields) and (policy is None or isinstance(policy, str))


def is_model_preset_file(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and is_model_preset(_read_mapping(path))


def model_preset(name_or_path: str) -> dict[str, Any]:
    """A model preset by name (configs/models/NAME.yaml) or by file path, as written (its policy name included)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / "models" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml"))
        raise ConfigError(f"model preset {name_or_path!r} not found; known presets: {', '.join(known)}")
    return _preset(_read_mapping(path), path)


def _preset(data: dict[str, Any], path: Path) -> dict[str, Any]:
    if not is_model_preset(data):
        raise ConfigError(f"{path} is not a model preset: it holds keys other than model keys and `precision: NAME`")
    return {"name": path.stem, **data}


def _set_model(tree: dict[str, Any], value: Any) -> None:
    """tree["model"] = value, where a preset (`NAME`, or `{preset: NAME, <overrides>}`) becomes its model keys."""
    if isinstance(value, str):
        _adopt_preset(tree, model_preset(value), {})
    elif isinstance(value, dict) and "preset" in value:
        _adopt_preset(tree, model_preset(str(value["preset"])), {k: v for k, v in value.items() if k != "preset"})
    else:
        tree["model"] = value


def _adopt_preset(tree: dict[str, Any], preset: dict[str, Any], overrides: dict[str, Any]) -> None:
    """The preset's model keys (with overrides) become the model section; the last preset adopted names the
    recommended policy (or none), which `_recommend_policy` applies once every override is in."""
    preset = dict(preset)
    tree[RECOMMENDED_POLICY] = preset.pop(PRESET_POLICY_KEY, None)
    tree["model"] = {**preset, **overrides}


def _recommend_policy(tree: dict[str, Any]) -> dict[str, Any]:
    """The model preset's policy becomes precision.preset unless the recipe or an override chose one."""
    recommended, precision = tree.pop(RECOMMENDED_POLICY, None), tree.get("precision")
    if recommended is not None and (precision is None or isinstance(precision, dict) and "preset" not in precision):
        tree["precision"] = {**(precision or {}), "preset": recommended}
    return tree


def parse_override(item: str) -> tuple[list[str], Any]:
    """`key.path=value` -> (["key", "path"], the value parsed as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. train.steps=200")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Set one `key.path=value` in a tree whose model section is resolved already (`model=NAME` resolves it)."""
    parts, value = parse_override(item)
    if parts == ["model"]:
        _set_model(tree, value)
        return
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: depth + 1])} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def overrides_tree(overrides: list[str]) -> dict[str, Any]:
    """The overrides as a nested mapping (a config overlay)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        apply_override(tree, item)
    return _recommend_policy(tree)


def load_tree(path: str | Path | None = None) -> dict[str, Any]:
    """The unvalidated tree of a recipe, a bare model preset, a run directory, or the built-in default."""
    path = storage.path(path) if path else DEFAULT_EXPERIMENT
    tree = read_yaml(path)
    if is_model_preset(tree):
        preset, tree = _preset(tree, path), {}
        _adopt_preset(tree, preset, {})
    elif "model" in tree:
        _set_model(tree, tree["model"])
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a recipe (or the built-in default), resolve presets, apply `key=value` overrides, validate."""
    tree = load_tree(path)
    for item in overrides:
        apply_override(tree, item)
    return build_config(_recommend_policy(tree))


def with_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """A copy of cfg with dotted overrides applied and validated again."""
    tree = cfg.model_dump(mode="json")  # its precision.preset is chosen: a new model preset does not change it
    for item in overrides:
        apply_override(tree, item)
    return build_config(_recommend_policy(tree))
