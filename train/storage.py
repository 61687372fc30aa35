"""Where files live: local paths, or Google Cloud Storage buckets (`gs://`), through etils.epath.

Local locations stay `pathlib.Path`s; a `gs://` one is an `epath.Path` (gcsfs underneath) with the same
methods. What cannot be done on an object store directly is staged locally: a tokenizer is read from a
local copy, prepared shards are written locally and uploaded (manifest last), and append-only outputs
(metrics.jsonl, TensorBoard events) are written locally and uploaded whole at each sync.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Union

from train.errors import ConfigError

# gcsfs otherwise first asks each bucket over gRPC whether it is zonal, and waits up to 60 s for an answer
# where gRPC cannot connect (an emulator, a proxy) before falling back to the JSON API it then uses anyway.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

AnyPath = Union[Path, "epath.Path"]  # noqa: F821
REMOTE_SCHEMES = ("gs://",)


def check_location(key: str, value: str) -> str:
    """A local path or a URL of a supported scheme; another scheme is refused (ValueError, as config validation
    reports it) before anything runs."""
    scheme, sep, _ = value.partition("://")
    if sep and f"{scheme}://" not in REMOTE_SCHEMES:
        raise ValueError(f"{key}={value!r}: the {scheme}:// scheme is not supported; use a local path or gs://")
    return value


def is_remote(location) -> bool:
    return str(location).startswith(REMOTE_SCHEMES)


def path(location) -> AnyPath:
    """A local pathlib.Path, or an epath.Path for a bucket location."""
    if is_remote(location):
        from etils import epath

        return epath.Path(str(location))
    return Path(location)


def size(file: AnyPath) -> int | None:
    """A file's size in bytes; None if it is not there."""
    if not file.is_file():
        return None
    stat = file.stat()
    return stat.st_size if hasattr(stat, "st_size") else stat.length


def staging_dir(location, purpose: str) -> Path:
    """A local directory that stands in for bucket location `location` (one per location and purpose)."""
    root = Path(os.environ.get("TESSERA_STAGING") or Path.home() / ".cache" / "tessera" / "staging")
    digest = hashlib.sha256(str(location).rstrip("/").encode()).hexdigest()[:16]
    return root / f"{purpose}-{digest}"


def local_stand_in(location, purpose: str) -> Path:
    """`location` itself when local; for a bucket location, its local staging directory for `purpose`."""
    return staging_dir(location, purpose) if is_remote(location) else Path(location)


def local_only(location, what: str) -> Path:
    """A local path for an output written with local file APIs; a bucket location is refused in one line."""
    if is_remote(location):
        raise ConfigError(f"{what} {location}: this output is written to a local directory; write it locally and "
                          "copy it to the bucket (gcloud storage cp -r)")
    return Path(location)


def local_copy(location: str, siblings: tuple[str, ...] = ()) -> Path:
    """A local path to read `location` from: itself if local, else a fresh download (with the named sibling
    files that exist beside it, such as a tokenizer's configs)."""
    if not is_remote(location):
        return Path(location)
    remote = path(location)
    local = staging_dir(location, "copy") / remote.name
    local.parent.mkdir(parents=True, exist_ok=True)
    for name in (remote.name, *siblings):
        source = remote.parent / name
        if source.is_file():
            write_atomic(local.parent / name, source.read_bytes())
        elif name != remote.name:
            (local.parent / name).unlink(missing_ok=True)
    return local


def write_atomic(target: Path, data: bytes) -> None:
    """Write a local file under a temporary name, then rename it: a reader sees it whole or not at all."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def files_under(root: AnyPath) -> list:
    """Every file below `root` (object stores have no recursive glob: walked a level at a time)."""
    found = []
    for child in root.iterdir():
        found += files_under(child) if child.is_dir() else [child]
    return found


def move_tree(source: AnyPath, target: AnyPath) -> None:
    """Move a directory: a rename where there are directories; on an object store, a copy of every object
    then a delete of the originals (not atomic: callers first remove what marks the tree as complete)."""
    if not is_remote(source):
        source.rename(target)
        return
    for file in files_under(source):
        file.copy(target / str(file.relative_to(source)))  # server-side on GCS: nothing passes through memory
    source.rmtree()


def upload(local: Path, remote: AnyPath) -> None:
    """Copy a local file to `remote` (an object is written whole: a reader sees the old or the new one)."""
    remote.write_bytes(local.read_bytes())


def upload_tree(local: Path, remote: AnyPath, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under `local` (but those named in `skip`) to `remote`, keeping the layout; files already
    there at the same size are not copied again (shards are written once, under names that say what they hold)."""
    for file in sorted(p for p in local.rglob("*") if p.is_file() and p.name not in skip
                       and ".tmp-" not in p.name):
        target = remote / str(file.relative_to(local))
        if size(target) == file.stat().st_size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        upload(file, target)
