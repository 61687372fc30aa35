"""Next-token prediction (decoders): the packed rows as the data pipeline makes them; the targets are
the inputs shifted by one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NextToken:
    name = "next_token"
    pairwise = False

    def rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return rows

    def prepare(self, batch, key):
        return batch
