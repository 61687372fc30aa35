"""The prepared-record format: one ArrayRecord record per document, holding named arrays.

A record is `TSR1`, a little-endian u32 header length, a JSON header `[[name, dtype, shape], ...]`, then
each array's raw bytes in header order. Today's records hold `tokens`; the format is open so that later
data (per-token loss weights, a pair or group id, image bytes) adds fields without a new file format.
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"TSR1"
# One record per chunk: every document is read alone, at random (a larger group would decompress its whole
# group for one document).
WRITER_OPTIONS = "group_size:1"


class RecordError(ValueError):
    """A record that is not in Tessera's format (a damaged shard)."""


def encode(fields: dict[str, np.ndarray]) -> bytes:
    header = json.dumps([[name, a.dtype.str, list(a.shape)] for name, a in fields.items()]).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *(np.ascontiguousarray(a).tobytes()
                                                                       for a in fields.values())])


def decode(data: bytes) -> dict[str, np.ndarray]:
    if data[:4] != MAGIC or len(data) < 8:
        raise RecordError("not a Tessera record (bad magic)")
    (size,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecordError("not a Tessera record (bad header)") from None
    fields, offset = {}, 8 + size
    for name, dtype, shape in header:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        end = offset + count * dtype.itemsize
        if end > len(data):
            raise RecordError(f"record field {name!r} runs past the record's end")
        fields[name] = np.frombuffer(data, dtype, count, offset).reshape(shape)
        offset = end
    return fields


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32: the shards are half the size for vocabularies under 65,536."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)
