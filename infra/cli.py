"""The `tessera` command line. User errors end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys

from infra.commands import config as config_command
from infra.commands import data, distill, embed, hf, launch, lora, plan, quantize, rl, sample, tokenizer, train
from infra.commands import eval as eval_command
from infra.commands.arguments import CommandParser
from infra.runtime import apply_platform_flags
from train.config import ConfigError, OptionError

USAGE_ERROR = 2
DIVERGED = 3
COMMANDS = (train, data, distill, rl, tokenizer, plan, sample, eval_command, embed, quantize, lora, hf, launch,
            config_command)


def flag(name: str) -> str:
    """How the command line spells an API argument: max_new_tokens -> --max-new-tokens."""
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="tessera", description="Train foundation models with JAX, from one CPU to pods.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_platform_flags()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from train.checkpoint import CheckpointError
    from train.loop import TrainingDiverged

    try:
        argv, job = launch.split_job(list(sys.argv[1:] if argv is None else argv))
        args = build_parser().parse_args(argv)
        if job:
            args.job = job
        return args.func(args)
    except OptionError as e:  # API argument names become this command line's flags
        print(f"tessera: error: {e.render(flag)}", file=sys.stderr)
        return USAGE_ERROR
    except (ConfigError, CheckpointError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except TrainingDiverged as e:
        print(f"tessera: {e.verdict}: {e}", file=sys.stderr)
        return DIVERGED
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
