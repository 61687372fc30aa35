"""Where documents come from: the built-in corpus, text files, JSONL (plain, gzip or zstd) and Parquet; and
examples for post-training: chats and preference pairs (JSONL, train/data/chat.py).

A source yields its records in one fixed order, each either a document's text or the reason it was
skipped (counted, never a crash): that order decides the prepared shards, so it never depends on the
machine or the number of workers. A record's key (its path, line or row) decides the held-out split.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train.config import ConfigError, DataConfig, first_line

@dataclass(frozen=True)
class Record:
    key: str  # where the record came from; hashed for the held-out split
    text: str | None  # None: skipped, for `problem`
    problem: str | None = None
    input_bytes: int = 0  # bytes of the input files consumed with this record (for progress)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by a hash of the document's key (its path or line), stable across machines."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def usable_text(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, the problem): not valid UTF-8, or empty."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if not text.strip():
        return None, "empty"
    return text, None


@dataclass(frozen=True)
class FileSource:
    """Documents from files: the built-in corpus, or globs of text, JSONL or Parquet files."""

    kind: str
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    max_documents: int | None = None

    @classmethod
    def of(cls, data: DataConfig) -> "FileSource":
        return cls(data.source, tuple(data.paths), data.text_field, data.max_documents)

    def files(self) -> list[Path]:
        if self.kind == "stdlib":
            root = stdlib_root()
            return sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
        found: set[Path] = set()
        for pattern in self.paths:
            matches = [Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file()]
            if not matches:
                problem = "matched no files" if glob.has_magic(pattern) else "does not exist"
                raise ConfigError(f"data.paths entry {pattern!r} {problem}")
            found.update(matches)
        return sorted(found)

    def identity(self) -> dict:
        """What the prepared shards depend on: the kind, the options and every input file with its size."""
        files = self.files()
        try:
            inputs = [{"path": str(p), "bytes": p.stat().st_size} for p in files]
        except OSError as e:
            raise ConfigError(f"cannot read an input file: {first_line(e)}") from None
        return {"kind": self.kind, "text_field": self.text_field if self.kind in ("jsonl", "parquet") else None,
                "max_documents": self.max_documents, "inputs": inputs}

    def records(self) -> Iterator[Record]:
        reader = {"stdlib": self._whole_files, "text": self._whole_files, "jsonl": self._jsonl,
                  "parquet": self._parquet, "chat": self._examples, "preferences": self._examples}[self.kind]
        count = 0
        for path in self.files():
            try:
                for record in reader(path):
                    if self.max_documents is not None and count >= self.max_documents:
                        return
                    count += 1
                    yield record
            except ConfigError:
                raise
            except Exception as e:  # unreadable, or not the compression its name says (gzip, zstd, OS errors)
                raise ConfigError(f"cannot read {path}: {first_line(e)}") from None

    def _whole_files(self, path: Path) -> Iterator[Record]:
        raw = path.read_bytes()
        text, problem = usable_text(raw)
        key = str(path.relative_to(stdlib_root())) if self.kind == "stdlib" else str(path)
        yield Record(key, text, problem, len(raw))

    def _jsonl(self, path: Path) -> Iterator[Record]:
        for line_no, line, delta in _lines(path):
            text, problem = _jsonl_text(line, self.text_field)
            yield Record(f"{path}:{line_no}", text, problem, delta)

    def _examples(self, path: Path) -> Iterator[Record]:
        """Chat or preference lines, each checked (a bad one is refused, naming its line: a training set is
        small and curated, a silently dropped example a bug); the record's text is the example as JSON."""
        from train.data.chat import ChatDataError, parse_chat, parse_preference

        parse = parse_chat if self.kind == "chat" else parse_preference
        for line_no, line, delta in _lines(path):
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ChatDataError(f"{where}: not valid JSON ({first_line(e)})") from None
            yield Record(where, json.dumps(parse(record, where), ensure_ascii=False), None, delta)

    def _parquet(self, path: Path) -> Iterator[Record]:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid for anything that is not Parquet
            raise ConfigError(f"cannot read {path} as Parquet: {first_line(e)}") from None
        if self.text_field not in table.schema_arrow.names:
            raise ConfigError(f"{path} has no column {self.text_field!r} (columns: {table.schema_arrow.names}); "
                              f"set data.text_field")
        row, size, groups = 0, path.stat().st_size, table.metadata.num_row_groups
        for g in range(groups):
            values = table.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
            for i, value in enumerate(values):
                row += 1
                last = g == groups - 1 and i == len(values) - 1
                if not isinstance(value, str):
                    yield Record(f"{path}#{row}", None, "missing_text_field", size if last else 0)
                    continue
                text, problem = usable_text(value.encode("utf-8", errors="surrogatepass"))
                yield Record(f"{path}#{row}", text, problem, size if last else 0)


def _lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, input bytes consumed since the last one) of a JSONL file's non-blank lines."""
    with open(path, "rb") as raw, _decompressed(raw, path) as lines:
        consumed = 0
        for line_no, line in enumerate(lines, 1):
            position = raw.tell()
            delta, consumed = position - consumed, position
            if line.strip():
                yield line_no, line, delta


def _decompressed(raw, path: Path):
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return contextlib.nullcontext(raw)  # a plain file is its own line stream, closed by its own `with`


def _jsonl_text(line: bytes, field: str) -> tuple[str | None, str | None]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "invalid_json"
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        return None, "missing_text_field"
    return usable_text(record[field].encode("utf-8", errors="surrogatepass"))


@dataclass(frozen=True)
class InMemorySource:
    """Documents given as (key, text) pairs: for the Python API and tests."""

    documents: tuple[tuple[str, str], ...]

    def identity(self) -> dict:
        digest = hashlib.sha256(json.dumps(self.documents).encode("utf-8", errors="surrogatepass")).hexdigest()
        return {"kind": "documents", "sha256": digest, "count": len(self.documents)}

    def records(self) -> Iterator[Record]:
        for key, text in self.documents:
            usable, problem = usable_text(text.encode("utf-8", errors="surrogatepass"))
            yield Record(key, usable, problem, len(text))


Source = FileSource | InMemorySource


def read_documents(source: Source) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Every usable (key, text) of a source, and the skipped records by cause: for tools that need the texts
    themselves (tokenizer training, contamination checks), never for training data."""
    skipped: Counter = Counter()
    docs = []
    for record in source.records():
        if record.text is None:
            skipped[record.problem] += 1
        else:
            docs.append((record.key, record.text))
    return docs, dict(skipped)


def stdlib_documents(limit: int | None = None) -> list[tuple[str, str]]:
    """The first `limit` usable files of the built-in corpus."""
    return read_documents(FileSource("stdlib", max_documents=limit))[0]


def source_for_files(spec: str, text_field: str = "text") -> FileSource:
    """A path or glob named on the command line, read by its extension: JSONL, Parquet, else text files."""
    name = spec.removesuffix(".gz").removesuffix(".zst")
    kind = "jsonl" if name.endswith(".jsonl") else "parquet" if name.endswith(".parquet") else "text"
    return FileSource(kind, (spec,), text_field)
