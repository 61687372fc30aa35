"""An opt-in on-disk cache of completions keyed by (checkpoint, prompt, sampling options, seed).

A repeated request returns the stored answer without running the model. Keys name the
exact weights (run directory, step, checkpoint write time), so retraining or resuming
never serves stale text. One JSON file per (prompt, options); writes are atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from train.generation import Completion, Generator, SamplingOptions, ScoreFn


class ResponseCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(checkpoint_id: str, prompt: str, opts: SamplingOptions) -> str:
        blob = json.dumps({"checkpoint": checkpoint_id, "prompt": prompt, "options": dataclasses.asdict(opts)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> list[Completion] | None:
        path = self.directory / f"{key}.json"
        try:
            return [Completion(**c) for c in json.loads(path.read_text())]
        except (FileNotFoundError, ValueError, TypeError):
            return None  # absent, or torn/foreign: recompute

    def put(self, key: str, completions: list[Completion]) -> None:
        path = self.directory / f"{key}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps([dataclasses.asdict(c) for c in completions]))
        tmp.replace(path)


def complete_cached(
    generator: Generator, checkpoint_id: str, prompts: list[str], opts: SamplingOptions,
    cache: ResponseCache | None, score: ScoreFn | None = None,
) -> list[list[Completion]]:
    """`generator.complete`, answering from the cache where it can; only the misses run, in one batch.
    A custom score function is code the key cannot name, so it bypasses the cache."""
    if cache is None or score is not None:
        return generator.complete(prompts, opts, score)
    keys = [cache.key(checkpoint_id, p, opts) for p in prompts]
    found = [cache.get(k) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        fresh = generator.complete([prompts[i] for i in missing], opts)
        for i, completions in zip(missing, fresh, strict=True):
            cache.put(keys[i], completions)
            found[i] = completions
    return found
