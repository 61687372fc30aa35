"""The `tessera` subcommands: one module each, its parser and its runner together."""
