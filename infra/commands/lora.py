"""`tessera lora merge RUN_DIR --out DIR`: fold a LoRA run's adapters into plain weights."""

from __future__ import annotations

from infra.commands.arguments import add_trained_run_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("lora", help="LoRA adapters: merge them into a plain run")
    lsub = p.add_subparsers(dest="lora_command", required=True)
    merge = lsub.add_parser("merge", help="write a run whose weights are W + A·B·alpha/rank (no adapters)")
    add_trained_run_arguments(merge)
    merge.add_argument("--out", required=True, help="the new run directory")
    merge.set_defaults(func=run_merge)


def run_merge(args) -> int:
    from infra.runtime import open_trained_run
    from train import storage
    from train.inference import run_config
    from train.lora_merge import merged_config, write_merged

    out = storage.local_only(args.out, "--out")
    merged_config(run_config(args.run_dir), out)  # every refusal before any weights load
    run, mesh, rules = open_trained_run(args.run_dir, args.overrides)
    write_merged(run, out, mesh, rules)
    print(f"merged the LoRA adapters of {run.run_dir} (step {run.step}, rank {run.cfg.model.lora.rank}) -> {out}")
    return 0
