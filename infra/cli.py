"""The `tessera` command line. User errors end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys

from infra.commands.eval import add_eval_parser
from infra.commands.launch import add_launch_parser, split_job
from infra.commands.quantize import add_quantize_parser
from infra.commands.sample import add_sample_parser
from train.config import ConfigError

USAGE_ERROR = 2
DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (the built-in default: a tiny decoder on the Python standard library)",
        description="Train or resume an experiment. CONFIG is a recipe YAML (or a model preset file); "
        "OVERRIDES are dotted key=value pairs such as train.steps=200 mesh.fsdp=4 run.dir=runs/x. "
        "An existing run.dir resumes from its latest checkpoint; CONFIG may also be that run directory. "
        "SIGTERM or Ctrl-C checkpoints and exits 0 (a second one aborts). Exit codes: 0 done or stopped "
        "cleanly, 2 bad input, 3 training diverged (non-finite steps), 130 aborted.",
    )
    _add_run_arguments(p, "experiment YAML, or a run directory (default: configs/experiments/tiny.yaml)")
    p.set_defaults(func=_run_train)


def _add_run_arguments(p, config_help: str) -> None:
    """What every command that trains takes: CONFIG, overrides, --force."""
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--force", action="store_true", help="continue a run directory with a changed (non-model) config")


def _add_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="train a student model from a teacher run (knowledge distillation)",
        description="Distill: train the student the config describes against a frozen teacher "
        "(distill.teacher=RUN_DIR), loss = alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*cross entropy "
        "(distill.temperature, distill.alpha, distill.kl=forward|reverse). Runs, resumes, stops and "
        "launches exactly like `tessera train`. With --dump-teacher-topk K --out DIR it instead writes the "
        "teacher's top-K log-probs for the training batches to DIR, for a student trained later with "
        "distill.teacher_topk=DIR (the teacher then need not fit beside it).",
    )
    _add_run_arguments(p, "experiment YAML with a distill section, or a distillation run directory")
    p.add_argument("--dump-teacher-topk", type=int, metavar="K", help="write the teacher's top-K log-probs and exit")
    p.add_argument("--out", help="with --dump-teacher-topk: the directory to write")
    p.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    from infra.runtime import run_dump_teacher_topk, run_train

    path, overrides = split_config_arg(args)
    if args.dump_teacher_topk is None:
        if args.out:
            raise ConfigError("--out goes with --dump-teacher-topk K; a distillation writes to run.dir")
        return run_train(path, overrides, force=args.force, command="distill")
    if not args.out:
        raise ConfigError("--dump-teacher-topk K needs --out DIR, the directory to write the teacher's top K to")
    return run_dump_teacher_topk(path, overrides, args.dump_teacher_topk, args.out)


def split_config_arg(args) -> tuple[str | None, list[str]]:
    # `tessera train model.n_layers=2` has no config file: the first positional is an override.
    if args.config and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _run_train(args) -> int:
    from infra.runtime import run_train

    path, overrides = split_config_arg(args)
    return run_train(path, overrides, force=args.force)


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer offline on the config's training documents",
        description="Train a byte-level BPE on the training split of the config's data source; writes tokenizer.json.",
    )
    t.add_argument("config", nargs="?", help="experiment YAML whose data section names the documents")
    t.add_argument("overrides", nargs="*", help="key.path=value")
    t.add_argument("--vocab-size", type=int, required=True, help="number of tokens including special tokens")
    t.add_argument("--out", default="tokenizer.json", help="output path (default: tokenizer.json)")
    t.set_defaults(func=_run_tokenizer_train)


def _run_tokenizer_train(args) -> int:
    from infra.runtime import run_tokenizer_train

    path, overrides = split_config_arg(args)
    return run_tokenizer_train(path, overrides, args.vocab_size, args.out)


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="FLOPs, memory per device and time for a config on a target, checked against the XLA compiler",
        description="Compile the real train step ahead of time for each --target (cpu: this machine's devices; "
        "a TPU slice such as v5e-16, v5p-128, v6e-256 or v5e-256x2, compiled through libtpu, no TPU needed) and "
        "set analytic FLOPs and memory beside the compiler's. A bare model preset is planned at 2048-token "
        "sequences, one per device, fully sharded (FSDP); overrides change that.",
    )
    p.add_argument("config", nargs="?", help="experiment YAML or model preset file")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--target", action="append", default=[], help="cpu, or a TPU slice like v5p-128 (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="write report.md, memory.png and plan.json into this directory")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for times (default 0.4)")
    p.add_argument("--tokens", type=float, help="token budget for the time estimate (default: 20 x parameters)")
    p.add_argument("--sweep", action="store_true", help="try mesh splits, remat policies and microbatches; rank them")
    p.add_argument("--jobs", type=int, default=1, help="sweep compiles at once (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one sweep compile may take (default 600)")
    p.add_argument("--max-batch", action="store_true", help="with --sweep: bisect the largest global batch that fits")
    p.add_argument("--budget-flops", type=float, help="compute budget C: suggest parameters and tokens (Chinchilla)")
    p.add_argument("--chip-hours", type=float, help="compute budget in device-hours on the target at --mfu")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from infra.commands.plan import PlanRequest, run_plan

    path, overrides = split_config_arg(args)
    return run_plan(
        PlanRequest(
            config=path, overrides=overrides, targets=args.target, json=args.json, out=args.out, mfu=args.mfu,
            tokens=args.tokens, sweep=args.sweep, jobs=args.jobs, timeout_s=args.timeout, max_batch=args.max_batch,
            budget_flops=args.budget_flops, chip_hours=args.chip_hours,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tessera", description="Train foundation models with JAX, from one CPU to pods.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_distill(sub)
    _add_tokenizer(sub)
    _add_plan(sub)
    add_sample_parser(sub)
    add_eval_parser(sub)
    add_quantize_parser(sub)
    add_launch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, job = split_job(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if job:
        args.job = job
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from train.checkpoint import CheckpointError
    from train.loop import TrainingDiverged

    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except TrainingDiverged as e:
        print(f"tessera: training diverged: {e}", file=sys.stderr)
        return DIVERGED
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
