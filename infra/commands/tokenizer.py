"""`tessera tokenizer train`: a byte-level BPE trained offline on the config's training documents."""

from __future__ import annotations

from infra.commands.arguments import add_config_arguments, split_config_arg
from train.recipes import load_config


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer offline on the config's training documents",
        description="Train a byte-level BPE on the training split of the config's data source; writes tokenizer.json.",
    )
    add_config_arguments(t, "experiment YAML whose data section names the documents")
    t.add_argument("--vocab-size", type=int, required=True, help="number of tokens including special tokens")
    t.add_argument("--out", default="tokenizer.json", help="output path (default: tokenizer.json)")
    t.set_defaults(func=run_train)


def run_train(args) -> int:
    from train.config import ConfigError
    from train.data.sources import FileSource, is_heldout, read_documents
    from train.tokenizer import train_bpe

    path, overrides = split_config_arg(args)
    cfg = load_config(path, overrides)
    if not cfg.data.raw:
        raise ConfigError(f"tokenizer train reads documents: data.source must be one of stdlib, text, jsonl, "
                          f"parquet (not {cfg.data.source if cfg.data.mixture is None else 'a mixture'})")
    docs, skipped = read_documents(FileSource.of(cfg.data))
    if not docs:
        raise ConfigError(f"data.source={cfg.data.source!r} gave no usable documents (skipped: {skipped or 'none'})")
    # Held-out documents stay unseen by the tokenizer too.
    train_docs = [d for d in docs if not is_heldout(d[0], cfg.data.heldout_fraction)]
    tok = train_bpe((text for _, text in train_docs), args.vocab_size, args.out)
    print(f"wrote {args.out}: {tok.vocab_size} tokens trained on {len(train_docs)} documents")
    return 0
