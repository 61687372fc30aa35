"""`tessera distill [CONFIG | RUN_DIR] [overrides]`: train a student against a frozen teacher, or write
the teacher's top-K log-probs once (`--dump-teacher-topk K --out DIR`)."""

from __future__ import annotations

from infra.commands.arguments import add_run_arguments, split_config_arg
from infra.commands.train import check_command, run_training
from train.config import ConfigError
from train.recipes import load_config


def add_parser(sub) -> None:
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
    add_run_arguments(p, "experiment YAML with a distill section, or a distillation run directory")
    p.add_argument("--dump-teacher-topk", type=int, metavar="K", help="write the teacher's top-K log-probs and exit")
    p.add_argument("--out", help="with --dump-teacher-topk: the directory to write")
    p.set_defaults(func=run)


def run(args) -> int:
    path, overrides = split_config_arg(args)
    if args.dump_teacher_topk is None:
        if args.out:
            raise ConfigError("--out goes with --dump-teacher-topk K; a distillation writes to run.dir")
        return run_training(load_config(path, overrides), force=args.force, command="distill")
    if not args.out:
        raise ConfigError("--dump-teacher-topk K needs --out DIR, the directory to write the teacher's top K to")
    return dump_teacher_topk(path, overrides, args.dump_teacher_topk, args.out)


def dump_teacher_topk(path: str | None, overrides: list[str], k: int, out: str) -> int:
    """Write the teacher's top-K log-probs over the config's training batches (one process)."""
    cfg = load_config(path, overrides)
    check_command(cfg, "distill")
    from infra.mesh import build_mesh, logical_rules
    from infra.runtime import enable_compilation_cache
    from train.teacher import dump_teacher_topk as dump

    enable_compilation_cache()
    dump(cfg, build_mesh(cfg), logical_rules(cfg), k, out)
    print(f"train the student from it: tessera distill {path or ''} {' '.join(overrides)} "
          f"distill.teacher_topk={out}".replace("  ", " "))
    return 0
