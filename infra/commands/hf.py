"""`tessera import-hf HF_DIR --out RUN_DIR` and `tessera export-hf RUN_DIR --out HF_DIR`: Hugging Face checkpoints
in and out (train/hf/)."""

from __future__ import annotations

import re

from infra.commands.arguments import add_trained_run_arguments
from train import storage
from train.config import ConfigError

DTYPES = ("float32", "bfloat16")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--shard-size {text!r} is not a size; write e.g. 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def run_import(args) -> int:
    import jax

    from infra.mesh import build_mesh, logical_rules
    from infra.runtime import enable_compilation_cache
    from train.config import build_config
    from train.hf.convert import import_checkpoint

    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise ConfigError(f"--max-seq-len must be positive, got {args.max_seq_len}")
    enable_compilation_cache()
    # The parameters are placed on one device (host memory holds them once); any mesh restores from that.
    placement = build_config({"mesh": {"data": 1}, "data": {"batch_size": 1}})
    mesh = build_mesh(placement, jax.devices("cpu")[:1])
    cfg = import_checkpoint(storage.local_only(args.hf_dir, "HF_DIR"), storage.local_only(args.out, "--out"), mesh, logical_rules(placement), dtype=args.dtype,
                            max_seq_len=args.max_seq_len)
    if cfg.model.clip is not None:
        v = cfg.model.clip.vision
        print(f"imported {args.hf_dir} -> {args.out} ({cfg.model.name}: text tower {cfg.model.n_layers} layers, d_model "
              f"{cfg.model.d_model}; image tower {v.n_layers} layers, d_model {v.d_model}, {v.image_size} px; precision "
              f"{cfg.precision.preset}); embed with `tessera embed {args.out} --text ... --image ...`, fine-tune with "
              f"`tessera train {args.out} data.paths=[pairs.jsonl]`")
        return 0
    print(f"imported {args.hf_dir} -> {args.out} ({cfg.model.name}, {cfg.model.n_layers} layers, "
          f"d_model {cfg.model.d_model}, precision {cfg.precision.preset}); sample it with "
          f"`tessera sample {args.out} --prompt ...`, fine-tune it with `tessera train {args.out} ...`")
    return 0


def run_export(args) -> int:
    from infra.runtime import open_trained_run
    from train.hf.architectures import ARCHITECTURES, architecture_for
    from train.hf.convert import export_checkpoint
    from train.inference import run_config

    if args.dtype is not None and args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    if args.architecture is not None and args.architecture not in ARCHITECTURES:
        raise ConfigError(f"--architecture {args.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    shard_bytes = parse_size(args.shard_size)
    out = storage.local_only(args.out, "--out")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; export into a new directory")
    cfg = run_config(args.run_dir)
    arch = ARCHITECTURES[args.architecture] if args.architecture else architecture_for(cfg.model)
    arch.write_config(cfg.model)  # refuses a model the class cannot express, before any weights load
    run, _, _ = open_trained_run(args.run_dir, args.overrides, dual_encoder=True)  # CLIPModel takes one
    export_checkpoint(run.cfg, run.params, out, args.dtype, shard_bytes, args.architecture)
    print(f"exported {args.run_dir} (step {run.step}) as {arch.hf_class} -> {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import-hf", help="turn a Hugging Face model folder into a run directory",
        description="Reads config.json, *.safetensors (one file or sharded with its index) and the tokenizer files, "
        "and writes a run directory: its config, the tokenizer, and the parameters as a checkpoint at step 0. "
        "Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM, "
        "GPT2LMHeadModel, BertForMaskedLM, CLIPModel (with its preprocessor_config.json's normalisation).",
    )
    p.add_argument("hf_dir", help="a folder written by save_pretrained (or downloaded from the Hub)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--dtype", default="float32",
                   help="parameter dtype: float32 (precision preset fp32, the default) or bfloat16 (bf16-pure)")
    p.add_argument("--max-seq-len", type=int,
                   help="rotary models: the context to train and sample with (default: the model's)")
    p.set_defaults(func=run_import)

    e = sub.add_parser(
        "export-hf", help="write a run's latest parameters as a Hugging Face model folder",
        description="Writes config.json, safetensors (sharded above --shard-size, with model.safetensors.index.json) "
        "and the tokenizer files, loadable by transformers' AutoModelForCausalLM (or AutoModelForMaskedLM; a dual "
        "encoder as CLIPModel, with preprocessor_config.json for CLIPImageProcessor).",
    )
    add_trained_run_arguments(e)
    e.add_argument("--out", required=True, help="the new model folder")
    e.add_argument("--dtype", help="tensor dtype: float32 or bfloat16 (default: the run's parameter dtype)")
    e.add_argument("--shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    e.add_argument("--architecture", help="the HF class's model_type (default: told by the model's features)")
    e.set_defaults(func=run_export)
