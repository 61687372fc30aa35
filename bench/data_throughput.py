"""Data pipeline throughput: preparing shards, reading rows, and a run's start-up on a corpus 20x larger.

    python bench/data_throughput.py prepare [--workers 2] [--bpe PATH]   # tokens/s, byte-level and a 32k BPE
    python bench/data_throughput.py read [--batches 300]                 # rows delivered, no model
    python bench/data_throughput.py startup [--copies 20]                # RSS and time to the first step, 1x vs 20x

The training loop's own cost (data read and placed while the step runs) is bench/loop_overhead.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.data.prepare import prepare
from train.data.sources import FileSource, read_documents, stdlib_root


def bench_prepare(workers: int, bpe: Path) -> dict:
    from train.tokenizer import train_bpe

    if not bpe.is_file():
        bpe.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        train_bpe((t for _, t in read_documents(FileSource("stdlib"))[0]), 32_768, bpe)
        print(f"trained a 32k BPE on the built-in corpus in {time.perf_counter() - started:.0f}s -> {bpe}", flush=True)
    result = {}
    for tokenizer, name in (("byte", "byte"), (str(bpe), "bpe32k")):
        for n in sorted({1, workers}):
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                manifest = prepare(FileSource("stdlib"), tokenizer, out, workers=n, shard_chars=2**20)
                seconds = time.perf_counter() - started
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            result[f"{name}_workers{n}"] = {"tokens": tokens, "seconds": round(seconds, 2),
                                            "tokens_per_sec": round(tokens / seconds)}
            print(json.dumps({f"{name}_workers{n}": result[f"{name}_workers{n}"]}), flush=True)
    return result


def bench_read(batches: int) -> dict:
    from train.data.corpus import batch_iterator, load_corpus, train_batches
    from train.recipes import load_config

    cfg = load_config(None, ["data.seq_len=256", "data.batch_size=16", "mesh.data=1"])
    corpus = load_corpus(cfg)  # prepares the built-in corpus into the cache the first time
    result = {}
    for prefetch in (0, 2):
        it = batch_iterator(train_batches(corpus.train, 16), prefetch)
        next(it)
        started = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - started
        result[f"prefetch{prefetch}"] = {"tokens_per_sec": round(batches * 16 * 256 / seconds),
                                         "batches_per_sec": round(batches / seconds, 1)}
    print(json.dumps(result), flush=True)
    return result


def _copies(root: Path, copies: int) -> Path:
    """The built-in corpus `copies` times as text files, each copy varied (its own first line), so no two
    documents are the same text."""
    files = sorted(p for p in stdlib_root().rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    for k in range(copies):
        for i, p in enumerate(files):
            target = root / f"copy{k:02d}" / f"{i:05d}.py"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f"# copy {k} of {p.name}\n".encode() + p.read_bytes())
    return root


def _first_step(data: str, run_dir: Path) -> dict:
    """A training run on prepared `data` (the d512 case's data shape): seconds until its first step's line,
    and the process's peak RSS."""
    cmd = [sys.executable, "-m", "infra.cli", "train", f"data.source={data}", "data.seq_len=256",
           "data.batch_size=16", "train.steps=3", "train.log_every=1", "train.eval_every=1000",
           "train.eval_batches=1", "checkpoint.every=1000", "mesh.data=1", f"run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = None
    for line in proc.stdout:
        if first is None and line.startswith("step 1 "):
            first = time.perf_counter() - started
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0 and first is not None, f"the run failed ({status})"
    return {"seconds_to_first_step": round(first, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def bench_startup(copies: int) -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = tmp / "x1", tmp / f"x{copies}"
        prepare(FileSource("stdlib"), "byte", small)
        started = time.perf_counter()
        prepare(FileSource("text", (str(_copies(tmp / "texts", copies) / "**" / "*.py"),)), "byte", large,
                workers=2)
        print(f"prepared the {copies}x corpus in {time.perf_counter() - started:.0f}s", flush=True)
        _first_step(str(small), tmp / "run-warmup")  # compiles once: both measured runs read the compilation cache
        for name, data in (("x1", small), (f"x{copies}", large)):
            manifest = json.loads((data / "manifest.json").read_text())
            result[name] = {"train_tokens": manifest["splits"]["train"]["tokens"],
                            **_first_step(str(data), tmp / f"run-{name}")}
            print(json.dumps({name: result[name]}), flush=True)
    big = result[f"x{copies}"]
    result["rss_growth_mb"] = big["peak_rss_mb"] - result["x1"]["peak_rss_mb"]
    result["startup_ratio"] = round(big["seconds_to_first_step"] / result["x1"]["seconds_to_first_step"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bpe", type=Path, default=Path.home() / ".cache" / "tessera" / "bench" / "bpe32k.json")
    r = sub.add_parser("read")
    r.add_argument("--batches", type=int, default=300)
    s = sub.add_parser("startup")
    s.add_argument("--copies", type=int, default=20)
    args = parser.parse_args()
    if args.what == "prepare":
        result = bench_prepare(args.workers, args.bpe)
    elif args.what == "read":
        result = bench_read(args.batches)
    else:
        result = bench_startup(args.copies)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
