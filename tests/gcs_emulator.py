"""A Google Cloud Storage API server on loopback for the bucket tests: `gcp-storage-emulator`, with two things
real GCS does on every object download that the emulator leaves out: the `x-goog-generation` header
(tensorstore, which orbax writes checkpoints with, refuses a download without it) and suffix ranges
(`Range: bytes=-N`, the last N bytes: how array_record reads a shard's footer).

Run as a script: `python tests/gcs_emulator.py PORT BUCKET` serves in memory until killed.
"""

from __future__ import annotations

import re
import sys

from gcp_storage_emulator.handlers import buckets, objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", "") or "")
    if suffix:
        size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
        headers = request._request_handler.headers
        del headers["Range"]
        headers["Range"] = f"bytes={max(0, size - int(suffix.group(1)))}-"
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the response already says so
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))


objects.download = download_with_generation  # before the server module builds its routes

from gcp_storage_emulator.server import create_server  # noqa: E402


def main(port: int, bucket: str) -> None:
    server = create_server("127.0.0.1", port, in_memory=True)
    buckets.create_bucket(bucket, server._storage)
    print(f"serving gs://{bucket} on 127.0.0.1:{port}", flush=True)
    server.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
