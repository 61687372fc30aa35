"""`tessera eval RUN_DIR`: cross entropy, perplexity, bits per token/char/byte and a contamination check."""

from __future__ import annotations

import json
from collections import Counter

from infra.commands.arguments import add_trained_run_arguments
from train.config import ConfigError

DEFAULT_MAX_TOKENS = 262_144  # enough for a stable figure in a minute or two on a laptop


def load_source(spec: str, text_field: str = "text"):
    """Documents from text files (a path or glob, one document per file), JSONL or Parquet, as (key, text)."""
    from train.data.sources import read_documents, source_for_files

    docs, skipped = read_documents(source_for_files(spec, text_field))
    if not docs:
        raise ConfigError(f"{spec} gave no usable documents (skipped: {skipped or 'none'})")
    return docs


def prepared_rows(source, tokenizer: str, seq_len: int):
    """The rows of files named on the command line, prepared (once, into the data cache) like any corpus:
    every document on the held-out side, in order."""
    from train.data.corpus import open_prepared, prepared_on_first_use
    from train.data.reader import SplitStream

    location = prepared_on_first_use(source, tokenizer, heldout_fraction=1.0)
    return SplitStream(open_prepared(str(location), tokenizer, "--data"), "heldout", seq_len, None)


def run(args) -> int:
    import jax

    from infra.runtime import open_trained_run
    from train.data.corpus import load_corpus
    from train.data.sources import source_for_files
    from train.evaluate import CONTAMINATION_RATIO, Scorer, contamination, metrics
    from train.inference import run_config

    threshold = CONTAMINATION_RATIO if args.threshold is None else args.threshold
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    if run_config(args.run_dir).objective in ("reward", "preference"):
        return run_pairs(args)
    if run_config(args.run_dir).objective == "contrastive":
        return run_dual_encoder(args)
    if args.zero_shot:
        raise ConfigError(f"--zero-shot classifies images; {args.run_dir} is not a dual encoder (model.clip)")
    if not run_config(args.run_dir).model.causal:
        raise ConfigError(f"{args.run_dir} holds a masked-LM encoder; tessera eval scores next-token prediction")
    candidates = load_source(args.contamination) if args.contamination else None
    data = source_for_files(args.data) if args.data else None
    if data is not None:
        data.files()  # a missing file is refused before the run loads
    run, mesh, rules = open_trained_run(args.run_dir, args.overrides)
    cfg = run.cfg
    scorer = Scorer(run.model.graphdef, jax.tree.map(lambda a: a.sharding, run.params), run.tokenizer, mesh, rules,
                    cfg.data.batch_size)
    max_rows = None if args.max_tokens is None else -(-args.max_tokens // cfg.data.seq_len)
    corpus = load_corpus(cfg) if args.data is None or candidates is not None else None
    scored = prepared_rows(data, cfg.data.tokenizer, cfg.data.seq_len) if args.data else corpus.heldout
    sums = scorer.corpus(run.params, scored, max_rows)
    result = {"run_dir": str(run.run_dir), "step": run.step, "data": args.data or "held-out split", **metrics(sums)}
    if candidates is not None:
        # The training sample is as many rows as were scored, from the start of the training stream.
        train_sums = scorer.corpus(run.params, corpus.train, max(1, int(sums.tokens) // cfg.data.seq_len + 1))
        documents = scorer.documents(run.params, candidates, cfg.data.seq_len)
        named = [(key, s) for (key, _), s in zip(candidates, documents, strict=True)]
        result["contamination"] = contamination(named, sums, train_sums, threshold).as_dict()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['data']} of {run.run_dir} at step {run.step}: {result['tokens']} predicted tokens")
    print(f"  cross entropy {result['cross_entropy']:.4f} nats/token, perplexity {result['perplexity']:.3f}")
    print(f"  bits per token {result['bits_per_token']:.4f}, per char {result['bits_per_char']:.4f}, "
          f"per byte {result['bits_per_byte']:.4f}; top-1 accuracy {result['accuracy']:.4f}")
    if candidates is not None:
        c = result["contamination"]
        print(f"contamination ({c['rule']}): held-out {c['heldout_bits_per_byte']:.4f} bits/byte, "
              f"training sample {c['train_bits_per_byte']:.4f}")
        for d in [*c["documents"], c["overall"]]:
            flag = "CONTAMINATED" if d["contaminated"] else "clean"
            print(f"  {flag:12s} ratio {d['ratio']:.3f}  {d['bits_per_byte']:.4f} bits/byte  {d['name']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a trained run: cross entropy, perplexity, bits per token/char/byte; contamination check",
        description="Scores the run's held-out split (or --data: text files or a glob, one document each, or a "
        ".jsonl with a 'text' field). Every token after a document's first is predicted, within rows of "
        "data.seq_len. --contamination compares each candidate's bits per byte with the held-out figure. A dual "
        "encoder (model.clip) is scored on held-out image-text pairs (or --data: a captions JSONL): contrastive "
        "loss, recall@1/5 both ways, and with --zero-shot (or data.classes) zero-shot accuracy.",
    )
    add_trained_run_arguments(p)
    p.add_argument("--data", help="text file/glob or .jsonl to score instead of the held-out split")
    p.add_argument("--contamination", help="candidate texts (file/glob or .jsonl) to check for training-set leakage")
    p.add_argument("--threshold", type=float,
                   help="flag a text whose bits per byte is below this fraction of the held-out figure (default 0.5)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"score at most about this many tokens of --data or the held-out split (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--zero-shot", metavar="CLASSES_JSON",
                   help="dual encoders: classify held-out images by their nearest class prompt (a classes.json: "
                   '{"template": "a {}", "classes": [...]}; images need a "label" field); default: data.classes')
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run_pairs(args) -> int:
    """A reward model's or a preference-finetuned policy's held-out pairs: loss, preference accuracy, margins."""
    import jax

    from infra.runtime import open_trained_run
    from train.data.corpus import eval_batches, load_corpus
    from train.evaluate import PairScorer
    from train.inference import params_of_run
    from train.objectives import make_objective

    if args.data or args.contamination:
        raise ConfigError(f"{args.run_dir} was trained on preference pairs; it is evaluated on its held-out pairs "
                          "(--data and --contamination score text)")
    run, mesh, rules = open_trained_run(args.run_dir, args.overrides)
    cfg, shardings = run.cfg, jax.tree.map(lambda a: a.sharding, run.params)
    objective = make_objective(cfg, run.tokenizer)
    reference = None
    if cfg.compares_with_a_reference_run:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), run.params)
        reference = params_of_run(cfg.train.init_from, cfg.model, abstract)  # the reference it was trained against
    heldout = load_corpus(cfg).heldout
    max_pairs = heldout.n_rows if args.max_tokens is None else max(1, args.max_tokens // (2 * cfg.data.seq_len))
    n_batches = max(1, -(-min(heldout.n_rows, max_pairs) // cfg.data.batch_size))
    batches = eval_batches(heldout, cfg.data.batch_size, n_batches)
    scorer = PairScorer(objective, run.model.graphdef, shardings, mesh, rules, reference)
    result = {"run_dir": str(run.run_dir), "step": run.step, "data": "held-out pairs",
              **scorer.batches(run.params, batches, min(heldout.n_rows, max_pairs))}
    if args.json:
        print(json.dumps(result))
        return 0
    margin = next(result[k] for k in ("reward_margin", "score_margin") if k in result)
    print(f"held-out pairs of {run.run_dir} at step {run.step}: {result['pairs']} pairs, loss {result['loss']:.4f}, "
          f"preference accuracy {result['accuracy']:.4f}, margin {margin:.4f}")
    return 0


def run_dual_encoder(args) -> int:
    """A dual encoder's held-out image-text pairs (or --data's): loss, retrieval recall@k, zero-shot accuracy."""
    import jax

    from infra.runtime import open_trained_run
    from train.data.image_text import load_image_text, read_classes
    from train.embedding_eval import EmbeddingScorer, scale_and_bias
    from train.objectives import make_objective
    from train.recipes import with_overrides

    if args.contamination:
        raise ConfigError(f"{args.run_dir} is a dual encoder; --contamination checks text models")
    if args.max_tokens is not None and args.max_tokens != DEFAULT_MAX_TOKENS:
        raise ConfigError("--max-tokens counts text tokens; a dual encoder is scored on all its held-out pairs")
    run, mesh, rules = open_trained_run(args.run_dir, args.overrides, dual_encoder=True)
    cfg = run.cfg
    if args.data:  # every pair of the given file is held out
        cfg = with_overrides(cfg, [f"data.paths=[{args.data}]"])
    classes_file = args.zero_shot or cfg.data.classes
    classes = read_classes(classes_file) if classes_file else None
    data = load_image_text(cfg) if not args.data else _heldout_only(cfg)
    scorer = EmbeddingScorer(run.model.graphdef, jax.tree.map(lambda a: a.sharding, run.params), mesh, rules,
                             cfg.data.batch_size, run.tokenizer, cfg.data.seq_len)
    log_scale, bias = scale_and_bias(run.params)
    result = {"run_dir": str(run.run_dir), "step": run.step, "data": args.data or "held-out pairs",
              **scorer.evaluate(run.params, data.heldout, data.heldout.n_rows, make_objective(cfg), log_scale, bias,
                                classes)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['data']} of {run.run_dir} at step {run.step}: {result['retrieval_pairs']} pairs, contrastive loss "
          f"{result['loss']:.4f}")
    print(f"  image->text recall@1 {result['image_to_text_recall_at_1']:.4f}, @5 "
          f"{result['image_to_text_recall_at_5']:.4f}; text->image recall@1 {result['text_to_image_recall_at_1']:.4f}, "
          f"@5 {result['text_to_image_recall_at_5']:.4f}")
    if "zero_shot_accuracy" in result:
        print(f"  zero-shot accuracy {result['zero_shot_accuracy']:.4f} over {result['zero_shot_images']} labelled "
              f"images, {result['zero_shot_classes']} classes (chance {1 / result['zero_shot_classes']:.4f})")
    elif classes is not None:
        print(f"  zero-shot: no held-out image has a label among the {len(classes[0])} classes of {classes_file}")
    return 0


def _heldout_only(cfg):
    """--data's pairs, all on the held-out side (whatever split field they carry)."""
    from train.data.image_text import ImageTextData, ImageTextPairs, PairRows
    from train.tokenizer import load_tokenizer

    d, vision = cfg.data, cfg.model.clip.vision
    pairs = ImageTextPairs.read(d.paths, d.text_field, d.image_field, heldout_fraction=1.0)
    pairs.heldout, pairs.train = pairs.train + pairs.heldout, []
    if not pairs.heldout:
        raise ConfigError(f"--data {d.paths[0]} gave no usable image-text pairs (skipped: {pairs.skipped or 'none'})")
    tokenizer = load_tokenizer(d.tokenizer)
    rows = PairRows(pairs.heldout, tokenizer, d.seq_len, vision.image_size, vision.channels, None)
    return ImageTextData(tokenizer, pairs, rows, rows, list(d.paths))
