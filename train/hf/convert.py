"""Hugging Face checkpoints in and out: `import_checkpoint` turns an HF model folder into a Tessera run directory
(config, tokenizer, a parameters-only checkpoint at step 0), `export_checkpoint` writes a run's parameters as an
HF folder that transformers loads.

One generic reader and writer walk the architecture's rule table (train/hf/architectures.py). Import assembles
one stacked parameter at a time on the host from memory-mapped safetensors and places it with its sharding, so
host memory holds the placed model plus one stacked tensor, not the model twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from model.config import ModelConfig
from train.checkpoint import Checkpointer
from train.config import IMAGE_SOURCE, ConfigError, ExperimentConfig, build_config, first_line
from train.hf.architectures import (ARCHITECTURES, Architecture, HfFormatError, architecture_for, architecture_of_config,
                                    clip_image_processor, read_clip_image_processor)
from train.hf.fields import Stack
from train.hf.files import CheckpointFiles, write_shards
from train.hf.mapping import Rule
from train.inference import flat_shapes
from train.hf.tokenizer_files import TOKENIZER_DIR, copy_tokenizer, write_tokenizer
from train.run_dir import write_config
from train.sharding import Rules
from train.state import abstract_model, param_shardings

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# --dtype of an import -> the precision preset the run gets: the parameters stored in that dtype.
IMPORT_PRESETS = {"float32": "fp32", "bfloat16": "bf16-pure"}


def _leaf(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[int(part)] if part.isdigit() and int(part) in tree else tree[part]
    return tree


def _set_leaf(tree: dict, path: str, value) -> None:
    parts = path.split("/")
    for part in parts[:-1]:
        tree = tree[int(part)] if part.isdigit() and int(part) in tree else tree[part]
    tree[parts[-1]] = value


@dataclass(frozen=True)
class Item:
    """One rule applied to one stack (or to the model's own parameters)."""

    rule: Rule
    stack: Stack | None

    def leaf_paths(self) -> list[str]:
        base = "" if self.stack is None else self.stack.path + "/"
        return [base + t for t in self.rule.tessera]

    def layers(self) -> tuple[int | None, ...]:
        return (None,) if self.stack is None else self.stack.hf_layers


class Layout:
    """An architecture's rule table for one config, bound to a checkpoint's naming (prefix, expert layout)."""

    def __init__(self, arch: Architecture, cfg: ModelConfig, prefix: str, expert_layout: str = ""):
        self.arch, self.cfg, self.prefix = arch, cfg, prefix
        self.experts = cfg.moe.num_experts if cfg.moe else 0
        self.items = [Item(r, None) for r in arch.global_rules(cfg)]
        for stack in arch.stacks(cfg):
            self.items += [Item(r, stack) for r in arch.layer_rules(cfg, stack, expert_layout)]

    def names(self, item: Item, layer: int | None) -> list[str]:
        return item.rule.hf_names(self.prefix, layer, self.experts)

    def expected(self, abstract_params) -> dict[str, tuple[int, ...]]:
        """Every HF tensor this config implies, with its shape (the rules' `save` run on shapes alone)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for item in self.items:
            leaves = [_leaf(abstract_params, p) for p in item.leaf_paths()]
            one = [jax.ShapeDtypeStruct(leaf.shape[0 if item.stack is None else 1:], np.float32) for leaf in leaves]
            out = jax.eval_shape(item.rule.save, one)
            for layer in item.layers():
                shapes.update(zip(self.names(item, layer), (tuple(o.shape) for o in out), strict=True))
        return shapes


def bind_layout(arch: Architecture, cfg: ModelConfig, files: CheckpointFiles) -> Layout:
    """The rule table for this checkpoint's prefix and (MoE) expert layout, each told by which names it has."""
    prefix = arch.prefix if arch.prefix + arch.probe in files else ""
    if prefix + arch.probe not in files:
        raise HfFormatError(f"the checkpoint has no tensor {arch.prefix + arch.probe}; it is not a {arch.hf_class}")
    moe = next((s for s in arch.stacks(cfg) if s.moe), Stack("", (0,), moe=True))
    first_moe = moe.hf_layers[0]
    for layout in arch.expert_layouts:
        rules = arch.layer_rules(cfg, moe, layout)
        if all(name in files for r in rules for name in r.hf_names(prefix, first_moe, 1)):
            return Layout(arch, cfg, prefix, layout)
    return Layout(arch, cfg, prefix, arch.expert_layouts[0] if arch.expert_layouts else "")


def check_tensors(layout: Layout, files: CheckpointFiles, abstract_params) -> None:
    """Refuse a checkpoint whose tensors do not match the config, naming the first that does not."""
    covered = {path for item in layout.items for path in item.leaf_paths()}
    for path in flat_shapes(abstract_params):
        if path not in covered:
            raise HfFormatError(f"no tensor of a {layout.arch.hf_class} checkpoint fills Tessera's parameter {path}")
    expected = layout.expected(abstract_params)
    for name, shape in expected.items():
        if name not in files:
            raise HfFormatError(f"the checkpoint has no tensor {name}, which {layout.arch.hf_class} with this "
                                "config.json needs")
        if files.shape(name) != shape:
            raise HfFormatError(f"tensor {name} has shape {list(files.shape(name))}; config.json implies {list(shape)}")
    tied_head = layout.cfg.tie_embeddings and "lm_head.weight"
    extra = [n for n in files.names() if n not in expected and not layout.arch.is_ignored(n) and n != tied_head]
    if extra:
        raise HfFormatError(f"the checkpoint has tensor {sorted(extra)[0]}, which {layout.arch.hf_class} with this "
                            "config.json does not use")


def read_params(layout: Layout, files: CheckpointFiles, abstract_params, place: Callable[[str, np.ndarray], Any]):
    """The parameter tree, each leaf assembled on the host (stacked over layers) and handed to `place`."""
    params = jax.tree.map(lambda x: x, abstract_params)  # same structure, leaves replaced one by one
    for item in layout.items:
        paths = item.leaf_paths()
        targets = [_leaf(abstract_params, p) for p in paths]
        stacked = [np.empty(t.shape, NUMPY_DTYPES[str(t.dtype)]) for t in targets]
        for position, layer in enumerate(item.layers()):
            arrays = item.rule.load([files.get(n) for n in layout.names(item, layer)])
            for out, array in zip(stacked, arrays, strict=True):
                if item.stack is None:
                    out[...] = array
                else:
                    out[position] = array
        for path, array in zip(paths, stacked, strict=True):
            _set_leaf(params, path, place(path, array))
    return params


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json; give the folder a Hugging Face model was saved to")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def imported_config(folder: Path, out: Path, dtype: str, max_seq_len: int | None) -> tuple[ExperimentConfig, Architecture]:
    """The run config an import writes: the model from config.json, the precision preset for `dtype`, the tokenizer
    copied into the run directory."""
    hf = read_hf_config(folder)
    arch = architecture_of_config(hf)
    try:
        fields = arch.read_config(hf)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a field missing or of the wrong kind, inside a sub-mapping
        reason = f"no field {e}" if isinstance(e, KeyError) else first_line(e)
        raise HfFormatError(f"config.json of {folder} cannot be read as a {arch.hf_class} config ({reason})") from None
    data = {}
    if "clip" in fields:  # the image processor's normalisation is part of what the model computes
        processor = folder / "preprocessor_config.json"
        settings = json.loads(processor.read_text()) if processor.is_file() else None
        fields["clip"]["vision"].update(read_clip_image_processor(settings))
        data = {"source": IMAGE_SOURCE}
    if max_seq_len is not None:
        if fields["position"] == "learned" and max_seq_len != fields["max_seq_len"]:
            raise ConfigError(f"--max-seq-len applies to rotary models; this one has a table of "
                              f"{fields['max_seq_len']} learned positions")
        fields["max_seq_len"] = max_seq_len
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder} has no tokenizer.json; save the model's tokenizer with it (a fast tokenizer "
                          "writes tokenizer.json)")
    tree = {
        "model": {"name": f"hf-{arch.model_type}", **fields},
        "precision": {"preset": IMPORT_PRESETS[dtype]},
        "data": {**data, "tokenizer": str((out / TOKENIZER_DIR / "tokenizer.json").resolve()),
                 "seq_len": min(256, max_seq_len or fields["max_seq_len"])},
        "run": {"dir": str(out)},
    }
    try:
        cfg = build_config(tree)
    except ConfigError as e:
        raise HfFormatError(f"config.json describes a model Tessera cannot build: {e}") from None
    return cfg, arch


def import_checkpoint(folder: Path, out: Path, mesh: Mesh, rules: Rules, dtype: str = "float32",
                      max_seq_len: int | None = None) -> ExperimentConfig:
    """Write run directory `out` from the HF model in `folder`; every refusal comes before anything is written."""
    folder, out = Path(folder), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; import into a new directory")
    cfg, arch = imported_config(folder, out, dtype, max_seq_len)
    files = CheckpointFiles(folder)
    model = abstract_model(cfg.model, cfg.precision.policy.model)
    layout = bind_layout(arch, cfg.model, files)
    check_tensors(layout, files, model.params)
    shardings = param_shardings(model, mesh, rules)

    def place(path: str, array: np.ndarray):
        return jax.make_array_from_callback(array.shape, _leaf(shardings, path), lambda index: array[index])

    params = read_params(layout, files, model.params, place)
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(folder, out / TOKENIZER_DIR)
    checkpointer = Checkpointer(out / "checkpoints", cfg.checkpoint)
    try:
        checkpointer.save(0, {"params": params}, {}, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    write_config(cfg, [f"imported from {folder.resolve()} ({arch.hf_class})"])
    return cfg


def hf_tensors(layout: Layout, params, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) of every tensor, in the rule table's order, one stacked parameter on the host at a time."""
    for item in layout.items:
        leaves = [np.asarray(jax.device_get(_leaf(params, p))) for p in item.leaf_paths()]
        for position, layer in enumerate(item.layers()):
            arrays = leaves if item.stack is None else [leaf[position] for leaf in leaves]
            arrays = item.rule.save([a.astype(np.float32) if a.dtype != np.float32 else a for a in arrays])
            for name, array in zip(layout.names(item, layer), arrays, strict=True):
                yield name, np.asarray(array).astype(dtype)


def export_checkpoint(cfg: ExperimentConfig, params, out: Path, dtype: str | None = None,
                      shard_bytes: int = 5 * 2**30, architecture: str | None = None) -> Path:
    """Write `params` (a run's, on any mesh) as an HF model folder `out`: config.json, safetensors (sharded above
    `shard_bytes`, with the index) and the tokenizer files."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; export into a new directory")
    arch = architecture_for(cfg.model) if architecture is None else ARCHITECTURES[architecture]
    hf_config = arch.write_config(cfg.model)
    dtype = dtype or cfg.precision.policy.model.params
    layout = Layout(arch, cfg.model, arch.prefix, arch.expert_layouts[0] if arch.expert_layouts else "")
    out.mkdir(parents=True)
    token_ids = write_tokenizer(cfg.data.tokenizer, out)  # a tokenizer that cannot be read stops it before the weights
    write_shards(hf_tensors(layout, params, NUMPY_DTYPES[dtype]), out, shard_bytes)
    if "text_config" in hf_config:  # a dual encoder: its text tower pools at the end token config.json names
        hf_config["text_config"].update(token_ids)
        (out / "preprocessor_config.json").write_text(json.dumps(clip_image_processor(cfg.model), indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({**hf_config, **token_ids, "torch_dtype": dtype}, indent=2) + "\n")
    return out
