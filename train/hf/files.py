"""Safetensors files read and written as memory maps, every dtype Hugging Face checkpoints ship in.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte
range, then the raw data. The `safetensors` package's numpy API cannot represent bfloat16 (the dtype most
checkpoints are published in), so the bytes are mapped here directly with ml_dtypes' bfloat16: reading a tensor
touches only its own pages, and a process can read just the rows it needs.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from train.config import ConfigError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class CheckpointFiles:
    """The tensors of one checkpoint folder: `model.safetensors`, or the shards its index names."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX).is_file():
            try:
                files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{folder / INDEX} is not a safetensors index (no weight_map of tensor names to "
                                  "files)") from None
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ConfigError(f"{folder} has no model.safetensors or {INDEX}; export the model with safetensors")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ConfigError(f"{INDEX} in {folder} names {name}, which is missing")
            header, offset = _read_header(path)
            size = path.stat().st_size
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                try:
                    start, end = entry["data_offsets"]
                    complete = offset + end <= size and end - start == np.dtype(DTYPES[entry["dtype"]]).itemsize * \
                        int(np.prod(entry["shape"]))
                except (KeyError, TypeError, ValueError):
                    complete = False
                if not complete:
                    raise ConfigError(f"{path} is damaged or truncated: tensor {key} does not fit its byte range")
                # Checkpoints from the TensorFlow era name LayerNorm parameters gamma and beta.
                key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
                self.entries[key] = (path, entry, offset)
        self._maps: dict[Path, np.memmap] = {}

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the mapped file (nothing is read until it is used)."""
        path, entry, offset = self.entries[name]
        if entry["dtype"] not in DTYPES:
            raise ConfigError(f"tensor {name} in {path.name} has dtype {entry['dtype']}, which is not supported")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        start, end = entry["data_offsets"]
        raw = self._maps[path][offset + start: offset + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _read_header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError(f"{path} is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        try:
            if length > path.stat().st_size:
                raise ValueError
            header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError
        except ValueError:
            raise ConfigError(f"{path} is not a safetensors file (its header is not a JSON object)") from None
    return header, 8 + length


def write_shards(tensors: Iterator[tuple[str, np.ndarray]], folder: Path, shard_bytes: int) -> list[Path]:
    """Write named tensors in order into shards of at most `shard_bytes` (a bigger tensor gets a shard of its
    own): `model.safetensors` when one shard holds them all, else `model-0000k-of-0000n.safetensors` and the
    index that maps every tensor to its shard. Each shard is written as soon as it is full, so the host holds
    one shard at a time; the final names (which need the count) are given at the end."""
    written: list[tuple[Path, list[str]]] = []
    shard: list[tuple[str, np.ndarray]] = []
    total = size = 0

    def flush():
        path = folder / f"shard-{len(written):05d}.partial"
        _write_file(path, shard)
        written.append((path, [name for name, _ in shard]))

    for name, array in tensors:
        if shard and size + array.nbytes > shard_bytes:
            flush()
            shard, size = [], 0
        shard.append((name, np.asarray(array, order="C")))  # (ascontiguousarray makes a scalar 1-d)
        size += array.nbytes
        total += array.nbytes
    flush()
    n = len(written)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for (path, _), name in zip(written, names):
        path.rename(folder / name)
    if n > 1:
        weight_map = {t: name for (_, tensor_names), name in zip(written, names) for t in tensor_names}
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [folder / name for name in names]


def _write_file(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in tensors:
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, array in tensors:
            f.write(array.tobytes())
