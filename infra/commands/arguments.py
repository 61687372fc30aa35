"""What the subcommands share on the command line: the parser class and the CONFIG / overrides arguments."""

from __future__ import annotations

import argparse

from train.config import ConfigError


class UsageError(ConfigError):
    """A malformed command line; reported like any other user error (one line, exit code 2)."""


class CommandParser(argparse.ArgumentParser):
    """argparse, but a usage error raises UsageError (one line, no usage dump) instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_config_arguments(p: argparse.ArgumentParser, config_help: str) -> None:
    """CONFIG (a recipe, a model preset or a run directory) followed by key.path=value overrides."""
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("overrides", nargs="*", help="key.path=value")


def add_run_arguments(p: argparse.ArgumentParser, config_help: str) -> None:
    """What every command that trains takes: CONFIG, overrides, --force."""
    add_config_arguments(p, config_help)
    p.add_argument("--force", action="store_true", help="continue a run directory with a changed (non-model) config")


def add_trained_run_arguments(p: argparse.ArgumentParser) -> None:
    """RUN_DIR of a trained run and `mesh.*` overrides: where inference puts the run on this machine."""
    p.add_argument("run_dir", help="a run directory written by `tessera train` or `tessera distill`")
    p.add_argument("overrides", nargs="*", help="mesh.key=value (default: every device on the batch axis)")


def split_config_arg(args) -> tuple[str | None, list[str]]:
    """(CONFIG or None, overrides): `tessera train model.n_layers=2` has no config file, so a first
    positional with `=` in it is an override."""
    if args.config and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)
