"""Composition root for commands: config -> devices -> mesh and rules -> train/."""

from __future__ import annotations

from train.config import load_config


def run_train(path: str | None, overrides: list[str]) -> int:
    cfg = load_config(path, overrides)  # validated before jax starts compiling anything

    from infra.mesh import build_mesh, logical_rules
    from train.loop import train

    rules = logical_rules(cfg)
    mesh = build_mesh(cfg)
    result = train(cfg, mesh, rules)
    if "eval_bits_per_byte" in result:
        bpb, base = result["eval_bits_per_byte"], result["unigram_bits_per_byte"]
        print(
            f"final held-out: loss {result['eval_loss']:.4f} nats/token, perplexity {result['eval_perplexity']:.3f}, "
            f"bits per byte {bpb:.4f} (unigram baseline {base:.4f}, {100 * (1 - bpb / base):.1f}% better) "
            f"-> {result['run_dir']}"
        )
    return 0


def run_tokenizer_train(path: str | None, overrides: list[str], vocab_size: int, out: str) -> int:
    from train.config import ConfigError
    from train.data import is_heldout, load_documents
    from train.tokenizer import TokenizerError, train_bpe

    cfg = load_config(path, overrides)
    # Held-out documents stay unseen by the tokenizer too.
    train_docs = [d for d in load_documents(cfg.data) if not is_heldout(d[0], cfg.data.heldout_fraction)]
    try:
        tok = train_bpe((text for _, text in train_docs), vocab_size, out)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {out}: {tok.vocab_size} tokens trained on {len(train_docs)} documents")
    return 0
