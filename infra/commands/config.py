"""`tessera config show|keys|schema`: the resolved config of a recipe, every key, and the JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

from infra.commands.arguments import add_config_arguments, split_config_arg
from train.config import ConfigError, dump_config
from train.recipes import load_config


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="show the resolved config, list every key, or export the JSON schema")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser(
        "show", help="the resolved config of a recipe plus overrides, as a run would write it to config.yaml",
        description="Resolve CONFIG (a recipe, a model preset, a run directory, or the built-in default) with the "
        "overrides, validate it, and print the YAML a run writes to RUN_DIR/config.yaml. Nothing is run.",
    )
    add_config_arguments(show, "experiment YAML, model preset or run directory (default: configs/experiments/tiny.yaml)")
    show.set_defaults(func=run_show)
    keys = csub.add_parser("keys", help="every config key with its type, default and description",
                           description="Every key a recipe or an override may set, read off the schema.")
    keys.add_argument("--json", action="store_true", help="print JSON")
    keys.set_defaults(func=run_keys)
    schema = csub.add_parser("schema", help="the config's JSON schema, for editors' YAML validation",
                             description="Print (or write with --out) the JSON schema of an experiment config.")
    schema.add_argument("--out", help="write the schema to this file instead of printing it")
    schema.set_defaults(func=run_schema)


def run_show(args) -> int:
    path, overrides = split_config_arg(args)
    print(dump_config(load_config(path, overrides)), end="")
    return 0


def run_keys(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from train.config_keys import config_keys

    keys = config_keys()
    if args.json:
        print(json.dumps([vars(k) for k in keys], indent=2))
        return 0
    table = Table(title="tessera config keys (set in a recipe, or as key.path=value)")
    for column in ("key", "type", "default", "description"):
        table.add_column(column, overflow="fold")
    for k in keys:
        table.add_row(k.path, k.type, k.default, k.description)
    Console().print(table)
    return 0


def run_schema(args) -> int:
    from train.config_keys import json_schema

    text = json_schema()
    if args.out:
        try:
            Path(args.out).write_text(text + "\n")
        except OSError as e:
            raise ConfigError(f"--out {args.out}: {e.strerror}") from None
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
