"""The `tessera` command line. User errors end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys

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
    p.add_argument("config", nargs="?", help="experiment YAML, or a run directory (default: configs/experiments/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--force", action="store_true", help="continue a run directory with a changed (non-model) config")
    p.set_defaults(func=_run_train)


def _split_config_arg(args) -> tuple[str | None, list[str]]:
    # `tessera train model.n_layers=2` has no config file: the first positional is an override.
    if args.config and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _run_train(args) -> int:
    from infra.runtime import run_train

    path, overrides = _split_config_arg(args)
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

    path, overrides = _split_config_arg(args)
    return run_tokenizer_train(path, overrides, args.vocab_size, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tessera", description="Train foundation models with JAX, from one CPU to pods.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_tokenizer(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
