"""`prepare`: documents -> tokenized ArrayRecord shards and a manifest, once, before any training.

The source's records are cut, in their fixed order, into chunks of about `shard_chars` characters; chunk k
becomes `train-k.arrayrecord` and `heldout-k.arrayrecord` (one record per document, ending with the
end-of-document token), their per-document token counts (`*.lengths.npy`) and, last, `chunk-k.json`. A
chunk depends on nothing but its own documents, so the output is byte for byte the same whatever the
number of workers, and a killed prepare resumes by writing only the chunks without their `chunk-k.json`.
Every file is written under a temporary name and renamed; `manifest.json` comes last, so a directory
with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from train.config import ConfigError
from train.data import records
from train.data.sources import Record, Source, is_heldout
from train import storage
from train.tokenizer import HF_SIBLINGS, BpeTokenizer, Tokenizer, load_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
DEFAULT_SHARD_CHARS = 64 * 2**20


def tokenizer_identity(name: str) -> str:
    """'byte', or a hash of the tokenizer's files (the tokenizer.json and the HF configs that change encoding)."""
    if name == "byte":
        return "byte"
    path = storage.local_copy(name, HF_SIBLINGS)
    digest = hashlib.sha256()
    for file in (path, path.with_name("tokenizer_config.json"), path.with_name("special_tokens_map.json")):
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return "sha256:" + digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def chunk_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


# ---------------------------------------------------------------- one chunk (in a worker)

_TOKENIZER: Tokenizer | None = None


def _load_worker_tokenizer(name: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(name)


def tokenized(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    ids = tokenizer.encode_batch(texts) if isinstance(tokenizer, BpeTokenizer) else [tokenizer.encode(t) for t in texts]
    eod = np.int32(tokenizer.eod_id)
    # Each document ends with <eod> (an HF encoding may end with it already: BERT's [SEP]).
    return [a if len(a) and a[-1] == eod else np.append(a, eod).astype(np.int32) for a in ids]


# What each kind of data becomes: how the reader packs its records into rows, and the records' fields.
# text: documents concatenated and cut into rows; chat: whole conversations (tokens, and `loss` marks on
# the tokens to learn) packed into rows, never split; preferences: a row per response of each pair.
FORMATS = {
    "text": ("concat", ("tokens",)),
    "chat": ("whole", ("tokens", "loss")),
    "preferences": ("pairs", ("chosen", "chosen_loss", "rejected", "rejected_loss")),
}
TOKEN_FIELDS = ("tokens", "chosen", "rejected")  # the fields holding token ids (the rest are loss marks)


def format_of(source: Source) -> str:
    kind = getattr(source, "kind", None)
    return kind if kind in FORMATS else "text"


def encoded(tokenizer: Tokenizer, fmt: str, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Each record's fields: a document's tokens (ending with <eod>), or an example through the chat template."""
    if fmt == "text":
        return [{"tokens": t} for t in tokenized(tokenizer, texts)]
    from train.data.chat import ChatTemplate

    template, out = ChatTemplate(tokenizer), []
    for text in texts:
        example = json.loads(text)
        if fmt == "chat":
            tokens, loss = template.encode(example)
            out.append({"tokens": tokens, "loss": loss})
            continue
        record = {}
        for side in ("chosen", "rejected"):
            tokens, loss = template.encode([*example["prompt"], {"role": "assistant", "content": example[side]}])
            record.update({side: tokens, f"{side}_loss": loss})
        out.append(record)
    return out


def record_length(record: dict[str, np.ndarray]) -> int:
    """The tokens a record needs in a row: a document's, or the longer response of a pair."""
    return max(len(record[f]) for f in TOKEN_FIELDS if f in record)


def write_chunk(job: tuple) -> dict:
    """Tokenize one chunk's documents and write its shards; returns the chunk's stats (also its chunk json)."""
    out, index, keys, texts, stats, fraction, dtype, fmt = job
    out, dtype = Path(out), np.dtype(dtype)
    split_of = ["heldout" if is_heldout(k, fraction) else "train" for k in keys]
    from array_record.python.array_record_module import ArrayRecordWriter

    examples = [{k: a.astype(dtype if k in TOKEN_FIELDS else np.uint8) for k, a in r.items()}
                for r in encoded(_TOKENIZER, fmt, texts)]
    result = {**stats, "index": index, "documents": {}, "tokens": {}}
    for split in SPLITS:
        docs = [r for r, s in zip(examples, split_of) if s == split]
        ids_of = [np.concatenate([r[f] for f in TOKEN_FIELDS if f in r]) for r in docs]
        result["documents"][split], result["tokens"][split] = len(docs), int(sum(map(len, ids_of)))
        if not docs:
            continue
        name = chunk_name(split, index)
        tmp = out / f"{name}.arrayrecord.tmp-{uuid.uuid4().hex[:8]}"
        writer = ArrayRecordWriter(str(tmp), records.WRITER_OPTIONS)
        for doc in docs:
            writer.write(records.encode(doc))
        writer.close()
        os.replace(tmp, out / f"{name}.arrayrecord")
        _save_npy(out / f"{name}.lengths.npy", np.array([record_length(d) for d in docs], np.uint32))
        if split == "train":
            ids, counts = np.unique(np.concatenate(ids_of), return_counts=True)
            _save_npy(out / f"{name}.counts.npy", np.stack([ids.astype(np.int64), counts.astype(np.int64)]))
    storage.write_atomic(out / f"chunk-{index:05d}.json", json.dumps(result, sort_keys=True).encode())
    return result


# ---------------------------------------------------------------- the whole source


def _chunks(stream: Iterator[Record], shard_chars: int) -> Iterator[tuple[int, list[Record]]]:
    index, chunk, chars = 0, [], 0
    for record in stream:
        chunk.append(record)
        chars += len(record.text or "")
        if chars >= shard_chars:
            yield index, chunk
            index, chunk, chars = index + 1, [], 0
    if chunk or index == 0:
        yield index, chunk


def _job(out: Path, index: int, chunk: list[Record], plan: dict) -> tuple:
    usable = [r for r in chunk if r.text is not None]
    stats = {"records": len(chunk), "skipped": dict(Counter(r.problem for r in chunk if r.text is None))}
    return (str(out), index, [r.key for r in usable], [r.text for r in usable], stats, plan["heldout_fraction"],
            plan["id_dtype"], plan["format"])


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in new if old.get(k) != new.get(k)] + [k for k in old if k not in new]
    return ", ".join(keys) or "nothing"


class NoDocuments(ConfigError):
    """Every record of a source was skipped (or it had none)."""

    def __init__(self, skipped: dict[str, int]):
        self.skipped = skipped
        super().__init__(f"the source gave no usable documents (skipped: {skipped or 'none'})")


class _Progress:
    """A rich progress bar over the input bytes (documents, tokens, MB/s, ETA), or nothing."""

    def __init__(self, enabled: bool, total_bytes: int, out: Path):
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn)

            self.bar = Progress(TextColumn(f"preparing {out}"), BarColumn(), TransferSpeedColumn(),
                                TextColumn("{task.fields[docs]:,} documents, {task.fields[tokens]:,} tokens"),
                                TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("prepare", total=total_bytes, docs=0, tokens=0)
        self.docs = self.tokens = 0

    def advance(self, stats: dict, input_bytes: int) -> None:
        self.docs += sum(stats["documents"].values())
        self.tokens += sum(stats["tokens"].values())
        if self.bar is not None:
            self.bar.update(self.task, advance=input_bytes, docs=self.docs, tokens=self.tokens)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def plan_of(source: Source, tokenizer: str, heldout_fraction: float, shard_chars: int) -> dict:
    """Everything a preparation's output depends on (what `prepare.json` and the manifest record)."""
    if not 0 <= heldout_fraction <= 1:
        raise ConfigError(f"the held-out fraction must be in [0, 1], got {heldout_fraction}")
    tok = load_tokenizer(tokenizer)
    fmt = format_of(source)
    if fmt != "text":
        from train.data.chat import ChatTemplate

        ChatTemplate(tok)  # a tokenizer without a chat format is refused before any file is read
    packing, fields = FORMATS[fmt]
    return {
        "format_version": FORMAT_VERSION, "source": source.identity(), "heldout_fraction": heldout_fraction,
        "shard_chars": shard_chars, "format": fmt, "packing": packing, "fields": list(fields),
        "tokenizer": {"name": tokenizer, "identity": tokenizer_identity(tokenizer), "vocab_size": tok.vocab_size,
                      "eod_id": tok.eod_id, "pad_id": tok.pad_id},
        "id_dtype": records.token_dtype(tok.vocab_size).name,
    }


def _existing(out, plan: dict) -> dict | None:
    """The manifest of this very preparation if `out` holds it; refuses another preparation there."""
    for name in ("manifest.json", "prepare.json"):
        file = out / name
        if file.is_file():
            old = json.loads(file.read_text())
            old = old.get("plan", old)
            if old != plan:
                raise ConfigError(f"{out} holds data prepared differently ({_differences(old, plan)} differ); "
                                  f"choose another output directory or delete it")
            if name == "manifest.json":
                return json.loads(file.read_text())
    return None


def prepare(source: Source, tokenizer: str, out: str | Path, *, heldout_fraction: float = 0.02,
            shard_chars: int = DEFAULT_SHARD_CHARS, workers: int = 1, progress: bool = False) -> dict:
    """Prepare `source` into `out` (see the module doc) and return its manifest. Nothing is done when `out`
    already holds this very preparation; another preparation there is refused. A gs:// `out` is prepared in
    a local staging directory and uploaded, manifest last."""
    return prepare_plan(source, plan_of(source, tokenizer, heldout_fraction, shard_chars), out, workers=workers,
                        progress=progress)


def prepare_plan(source: Source, plan: dict, out: str | Path, *, workers: int = 1, progress: bool = False) -> dict:
    """`prepare` with its plan already made (`plan_of`): for a caller that also names `out` after the plan."""
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    target = storage.path(out)
    done = _existing(target, plan)
    if done is not None:
        return done
    local = storage.staging_dir(out, "prepare") if storage.is_remote(out) else Path(out)
    if local != target:
        try:
            _existing(local, plan)
        except ConfigError:  # a staged, unfinished preparation of other inputs: this one replaces it
            shutil.rmtree(local)
    local.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(local / "prepare.json", json.dumps(plan, indent=1).encode())
    bar = _Progress(progress, sum(i.get("bytes", 0) for i in plan["source"].get("inputs", [])), out)
    try:
        n_chunks = _write_chunks(source, local, plan, workers, bar)
    finally:
        bar.close()
    manifest = _write_manifest(local, plan, n_chunks)
    if local != target:
        storage.upload_tree(local, target, skip=("manifest.json",))
        storage.upload(local / "manifest.json", target / "manifest.json")  # last: the directory is complete
        shutil.rmtree(local)
    return manifest


def _write_chunks(source: Source, out: Path, plan: dict, workers: int, bar: _Progress) -> int:
    n_chunks = 0
    pending: deque = deque()
    pool = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_load_worker_tokenizer, initargs=(plan["tokenizer"]["name"],))
    else:
        _load_worker_tokenizer(plan["tokenizer"]["name"])
    try:
        for index, chunk in _chunks(source.records(), plan["shard_chars"]):
            n_chunks = index + 1
            input_bytes = sum(r.input_bytes for r in chunk)
            done = out / f"chunk-{index:05d}.json"
            if done.is_file():
                bar.advance(json.loads(done.read_text()), input_bytes)
                continue
            job = _job(out, index, chunk, plan)
            if pool is None:
                bar.advance(write_chunk(job), input_bytes)
                continue
            pending.append((pool.submit(write_chunk, job), input_bytes))
            while len(pending) > 2 * workers:  # a bounded window: the corpus is never all in memory
                future, size = pending.popleft()
                bar.advance(future.result(), size)
        while pending:
            future, size = pending.popleft()
            bar.advance(future.result(), size)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return n_chunks


def _write_manifest(out: Path, plan: dict, n_chunks: int) -> dict:
    chunks = [json.loads((out / f"chunk-{i:05d}.json").read_text()) for i in range(n_chunks)]
    skipped: Counter = Counter()
    for c in chunks:
        skipped.update(c["skipped"])
    splits = {}
    for split in SPLITS:
        shards = [{"file": f"{chunk_name(split, c['index'])}.arrayrecord", "documents": c["documents"][split],
                   "tokens": c["tokens"][split]} for c in chunks if c["documents"][split]]
        for shard in shards:
            shard["bytes"] = (out / shard["file"]).stat().st_size
        lengths = [np.load(out / s["file"].replace(".arrayrecord", ".lengths.npy"), allow_pickle=False) for s in shards]
        _save_npy(out / f"{split}.lengths.npy", np.concatenate(lengths) if lengths else np.zeros(0, np.uint32))
        splits[split] = {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                         "shards": shards}
    if not splits["train"]["documents"] and not splits["heldout"]["documents"]:
        raise NoDocuments(dict(skipped))
    counts = np.zeros(plan["tokenizer"]["vocab_size"], np.int64)
    for shard in splits["train"]["shards"]:
        ids, n = np.load(out / shard["file"].replace(".arrayrecord", ".counts.npy"), allow_pickle=False)
        np.add.at(counts, ids, n)
    _save_npy(out / "train.counts.npy", counts)
    manifest = {"plan": plan, "splits": splits, "skipped": dict(sorted(skipped.items())),
                "records": sum(c["records"] for c in chunks)}
    storage.write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest
