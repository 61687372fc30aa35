"""A mixture of prepared sources, sampled by weight.

A weight counts tokens: every row holds `seq_len` tokens whatever its source, so a source with weight 0.7
gets 70% of the rows and so 70% of the tokens (the epoch's last, padded row of a source aside). The rows
are dealt in blocks of BLOCK: each block gives every source its share of slots (largest remainders), in
an order shuffled by the seed and the block. Row g's source and its row number within that source are
computed directly, so any process reads any row without the rows before it, and the shares are exact to
within 1/BLOCK over any whole number of blocks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from train.config import ConfigError
from train.data.reader import SplitStream

BLOCK = 4096


def shares(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Slots per block for each weight: proportional, summing to `block` (largest remainders)."""
    exact = np.asarray(weights, np.float64) / np.sum(weights) * block
    slots = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - slots), kind="stable")[: block - slots.sum()]:
        slots[i] += 1
    return slots


class Mixture:
    """Rows from several SplitStreams (same seq_len), interleaved by weight (one stream: its rows as they are)."""

    def __init__(self, streams: list[SplitStream], weights: list[float], seed: int):
        self.streams, self.seed = streams, seed
        self.slots = shares(weights)
        if not self.slots.all():
            raise ConfigError(f"data.mixture weights {weights}: a weight below 1/{BLOCK} of their sum draws no rows; "
                              "raise it or drop the source")
        self.seq_len = streams[0].seq_len
        self.n_tokens = sum(s.n_tokens for s in streams)
        self.n_rows = sum(s.n_rows for s in streams)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, that source's rank of the slot within the block)."""
        with self._lock:
            if block in self._blocks:
                return self._blocks[block]
        source = np.repeat(np.arange(len(self.slots)), self.slots)
        source = source[np.random.default_rng([self.seed % 2**64, block, 2]).permutation(BLOCK)]
        rank = np.zeros(BLOCK, np.int64)
        for s in range(len(self.slots)):
            where = source == s
            rank[where] = np.arange(where.sum())
        with self._lock:
            self._blocks[block] = (source, rank)
            if len(self._blocks) > 2:
                self._blocks.popitem(last=False)
        return source, rank

    def locate(self, g: int) -> tuple[int, int]:
        """(source, row within that source's stream) of mixture row g."""
        block, slot = divmod(int(g), BLOCK)
        source, rank = self._block(block)
        s = int(source[slot])
        return s, block * int(self.slots[s]) + int(rank[slot])

    def rows_before(self, g: int) -> np.ndarray:
        """How many of rows [0, g) each source gave: its tokens seen are that times seq_len."""
        block, slot = divmod(int(g), BLOCK)
        source, _ = self._block(block)
        return block * self.slots + np.bincount(source[:slot], minlength=len(self.slots))

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        located = np.array([self.locate(g) for g in np.asarray(index).reshape(-1)]).reshape(-1, 2)
        out: dict[str, np.ndarray] = {}
        for s in np.unique(located[:, 0]):  # each source's rows in one call, put back in the batch's order
            where = np.flatnonzero(located[:, 0] == s)
            for key, value in self.streams[s].rows(located[where, 1]).items():
                out.setdefault(key, np.empty((len(located), *value.shape[1:]), value.dtype))[where] = value
        return out
