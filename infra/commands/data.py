"""`tessera data prepare` (documents -> tokenized shards, once), `tessera data inspect` (what a prepared
directory holds) and `tessera data synth` (seeded post-training examples, written as JSONL)."""

from __future__ import annotations

import json

from train.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare corpora into tokenized shards; inspect prepared data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser(
        "prepare", help="tokenize documents once into ArrayRecord shards and a manifest",
        description="SOURCES: 'stdlib' (the built-in corpus), or globs of text files (one document each), "
        ".jsonl files (optionally .gz or .zst) or .parquet files. Re-running on the same inputs does nothing; "
        "an interrupted run resumes, writing only the shards still missing.",
    )
    prep.add_argument("sources", nargs="+", help="'stdlib' or file globs (quote them)")
    prep.add_argument("--out", required=True, help="the prepared directory to write")
    prep.add_argument("--tokenizer", default="byte", help="'byte' (default) or the path of a tokenizer.json")
    prep.add_argument("--format", choices=("text", "chat", "preferences"), default="text",
                      help="text: documents (default); chat: JSONL conversations for supervised finetuning; "
                      "preferences: JSONL prompt/chosen/rejected pairs")
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text (default text)")
    prep.add_argument("--heldout-fraction", type=float, default=0.02,
                      help="share of documents held out for evaluation, by a hash of each one's key (default 0.02)")
    prep.add_argument("--max-documents", type=int, help="read only the first N records")
    prep.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    prep.add_argument("--shard-mb", type=float, default=64,
                      help="megabytes (millions of characters) of text per shard (default 64)")
    prep.set_defaults(func=run_prepare)
    ins = dsub.add_parser("inspect", help="counts, splits, skipped records and a few decoded documents")
    ins.add_argument("path", help="a prepared directory")
    ins.add_argument("--samples", type=int, default=3, help="documents to decode and show (default 3)")
    ins.add_argument("--json", action="store_true", help="print the manifest's figures as JSON")
    ins.set_defaults(func=run_inspect)
    syn = dsub.add_parser("synth", help="write seeded examples (no download): post-training JSONL, or image-text pairs",
                          description="sft: chats whose answers follow from their prompts by checkable rules; "
                          "preferences: the same prompts with a chosen (right) and a rejected (wrong) answer; "
                          "images: coloured shapes with compositional captions, whole compositions held out; "
                          "digits: scikit-learn's bundled 8x8 handwritten digits, captioned. Image sets are a "
                          "directory: images/, captions.jsonl (data.source=images) and classes.json (zero-shot).")
    syn.add_argument("kind", choices=("sft", "preferences", "images", "digits"))
    syn.add_argument("--out", required=True, help="the JSONL file (sft, preferences) or directory (images, digits)")
    syn.add_argument("--count", type=int, help="examples to write (default 2000; images: 4000)")
    syn.add_argument("--size", type=int, help="images, digits: side of the images in pixels (default 32; 8)")
    syn.add_argument("--heldout-fraction", type=float, default=0.2,
                     help="images: share of the compositions held out, every image of them (default 0.2)")
    syn.add_argument("--heldout", type=int, default=400, help="digits: images held out (default 400)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--tasks", default="sort,upper,add,docstring",
                     help="comma-separated tasks: sort, upper, add, docstring (default all)")
    syn.set_defaults(func=run_synth)


def file_source(patterns: list[str], text_field: str, max_documents: int | None, fmt: str = "text"):
    from train.data.sources import FileSource, source_for_files

    if patterns == ["stdlib"]:
        return FileSource("stdlib", max_documents=max_documents)
    if fmt != "text":
        return FileSource(fmt, tuple(patterns), text_field, max_documents)
    kinds = {source_for_files(p).kind for p in patterns}
    if len(kinds) > 1:
        raise ConfigError(f"the sources mix kinds ({', '.join(sorted(kinds))}); prepare each kind into its own "
                          "directory and train on a data.mixture of them")
    return FileSource(kinds.pop(), tuple(patterns), text_field, max_documents)


def run_prepare(args) -> int:
    from train.data.prepare import NoDocuments, prepare

    if args.max_documents is not None and args.max_documents < 1:
        raise ConfigError(f"--max-documents must be at least 1, got {args.max_documents}")
    if not args.shard_mb > 0:
        raise ConfigError(f"--shard-mb must be > 0, got {args.shard_mb}")
    source = file_source(args.sources, args.text_field, args.max_documents, args.format)
    try:
        manifest = prepare(source, args.tokenizer, args.out, heldout_fraction=args.heldout_fraction,
                           shard_chars=int(args.shard_mb * 2**20), workers=args.workers, progress=True)
    except NoDocuments as e:
        hint = f"; is --text-field {args.text_field!r} right?" if source.kind in ("jsonl", "parquet") else ""
        raise ConfigError(f"{' '.join(args.sources)} gave no usable documents (skipped: {e.skipped or 'none'}{hint})") \
            from None
    print(summary(manifest, args.out))
    return 0


def summary(manifest: dict, path: str) -> str:
    splits = manifest["splits"]
    parts = [f"{name} {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shards"
             for name, s in splits.items()]
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
    tok = manifest["plan"]["tokenizer"]
    return (f"{path}: {'; '.join(parts)}; skipped: {skipped}; tokenizer {tok['name']} "
            f"({tok['vocab_size']:,} tokens, ids as {manifest['plan']['id_dtype']})")


def run_inspect(args) -> int:
    from train.data.reader import Documents, PreparedData
    from train.tokenizer import TokenizerError, load_tokenizer

    data = PreparedData(args.path)
    if args.json:
        print(json.dumps({"splits": {k: {f: v[f] for f in ("documents", "tokens")} for k, v in
                                     data.manifest["splits"].items()},
                          "skipped": data.manifest["skipped"], "records": data.manifest["records"],
                          "tokenizer": data.tokenizer, "id_dtype": data.plan["id_dtype"],
                          "source": {k: v for k, v in data.plan["source"].items() if k != "inputs"},
                          "inputs": len(data.plan["source"].get("inputs", []))}))
        return 0
    print(summary(data.manifest, args.path))
    inputs = data.plan["source"].get("inputs", [])
    print(f"from {data.plan['source']['kind']}: {len(inputs):,} input files, "
          f"{sum(i['bytes'] for i in inputs) / 1e6:,.1f} MB; held-out fraction {data.plan['heldout_fraction']}")
    try:
        tokenizer = load_tokenizer(data.tokenizer["name"])
    except TokenizerError:
        tokenizer = None
        print(f"(tokenizer {data.tokenizer['name']} is not here: showing ids)")
    documents = Documents(data, "train") if data.split("train")["documents"] else None
    for i in range(min(args.samples, data.split("train")["documents"])):
        record = documents[i]
        ids = record["tokens" if "tokens" in record else "chosen"]
        shown = tokenizer.decode(ids[:200]) if tokenizer is not None else " ".join(map(str, ids[:40]))
        print(f"--- train document {i} ({len(ids):,} tokens)\n{shown}")
    return 0


def run_synth(args) -> int:
    from train.data import synth

    if args.kind in ("images", "digits"):
        return run_image_synth(args)
    args.count = 2000 if args.count is None else args.count
    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    make = synth.chats if args.kind == "sft" else synth.preferences
    out = synth.write_jsonl(make(args.count, args.seed, tasks), args.out)
    print(f"wrote {args.count:,} {'chats' if args.kind == 'sft' else 'preference pairs'} to {out}")
    return 0


def run_image_synth(args) -> int:
    from train.data import image_synth

    if args.kind == "images":
        made = image_synth.shapes(args.out, count=4000 if args.count is None else args.count, seed=args.seed,
                                  size=args.size or 32, heldout_fraction=args.heldout_fraction)
    else:
        if args.count is not None:
            raise ConfigError("--count does not apply to digits (scikit-learn ships 1,797 images); use --heldout")
        made = image_synth.digits(args.out, heldout=args.heldout, seed=args.seed, size=args.size or 8)
    print(f"wrote {made['images']:,} images ({made['train']:,} train, {made['heldout']:,} held out, "
          f"{made['classes']} classes) to {made['out']}: captions.jsonl, classes.json")
    return 0
