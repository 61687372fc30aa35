"""How long a collective takes on a TPU slice: which chips it spans, the links between them, ring costs.

Link figures per chip (one direction of one ICI link, HBM bandwidth, DCN per chip) are the
published ones collected in "How to Scale Your Model" (Austin et al., Google DeepMind 2025,
jax-ml.github.io/scaling-book, the TPU chapter's table); DCN is the least certain of them.

A collective's group of chips is read from the compiled program's replica groups and mapped
to the chips' coordinates in the slice. Along each physical axis the group spans, a
bidirectional ring moves data both ways on every link when the axis wraps around (a torus) and
effectively one way when it does not, so each spanned axis adds 2 or 1 link-widths of bandwidth.
With B that sum and V the larger of the collective's input and output per chip:

- all-gather, reduce-scatter: V (k-1)/k / B (a ring over k chips);
- all-reduce: twice that (a reduce-scatter, then an all-gather);
- all-to-all: V (k-1)/k x max(1, k/4) / B (on a bidirectional ring a shard travels k/4 hops on
  average);
- collective-permute: V / (one link, one way) x the most pairs routed over one link.

Across slices the groups' DCN share is added: the data one chip sends over DCN at its DCN
bandwidth. Latency per hop is not modelled (it matters only for collectives of a few KiB).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

GB = 1e9


@dataclass(frozen=True)
class ChipLinks:
    hbm_bytes_per_s: float
    ici_link_bytes_per_s: float  # one direction of one link
    dcn_bytes_per_s: float  # per chip, one direction
    wraps: str  # "full-16": only axes of 16 chips wrap around (v5e, v6e); "multiple-of-4": v4, v5p cubes
    clock_hz: float  # the TensorCore clock: peak bf16 FLOP/s / (MXUs x MXU size^2 x 2), to read compiler cycles


LINKS = {
    "TPU v4": ChipLinks(1.2e12, 45 * GB, 6.25 * GB, "multiple-of-4", 275e12 / (2 * 4 * 128 * 128 * 2)),
    "TPU v5e": ChipLinks(8.1e11, 45 * GB, 6.25 * GB, "full-16", 197e12 / (4 * 128 * 128 * 2)),
    "TPU v5p": ChipLinks(2.8e12, 90 * GB, 6.25 * GB, "multiple-of-4", 459e12 / (2 * 4 * 128 * 128 * 2)),
    "TPU v6e": ChipLinks(1.64e12, 90 * GB, 6.25 * GB, "full-16", 918e12 / (4 * 256 * 256 * 2)),
}


def chip_links(device_kind: str) -> ChipLinks:
    """The link table's entry for a jax device kind (infra/devices.py names the chip)."""
    from infra.devices import device_spec

    return LINKS[device_spec(device_kind).name]


def axis_wraps(rule: str, size: int) -> bool:
    return size == 16 if rule == "full-16" else size >= 4 and size % 4 == 0


def _iota_groups(text: str) -> np.ndarray:
    """`[G,S]<=[dims]T(perm)`: device ids laid out as an iota of `dims`, transposed, read as G groups of S."""
    found = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
    shape = [int(x) for x in found.group(1).split(",")]
    dims = [int(x) for x in found.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if found.group(3):
        ids = ids.transpose([int(x) for x in found.group(3).split(",")])
    return ids.reshape(shape[0], -1) if len(shape) > 1 else ids.reshape(1, -1)


def _mesh_groups(text: str) -> np.ndarray:
    """`mesh['axis_0'=4,'axis_1'=2] {'axis_0'}`: device ids as an iota over the named axes (or as the iota
    `device_ids=([dims]T(perm))` reshaped to them); a group varies the listed axes."""
    found = re.fullmatch(r"mesh\[([^\]]*)\](?:,? *(?:device_ids=\(|<=)\[([\d,]+)\](?:T\(([\d,]+)\))?\)?)?\s*\{([^}]*)\}",
                         text.strip())
    axes = re.findall(r"'([^']+)'=(\d+)", found.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    ids = np.arange(math.prod(sizes))
    if found.group(2):
        ids = ids.reshape([int(x) for x in found.group(2).split(",")])
        if found.group(3):
            ids = ids.transpose([int(x) for x in found.group(3).split(",")])
    ids = ids.reshape(sizes)
    grouped = [names.index(a) for a in re.findall(r"'([^']+)'", found.group(4))]
    rest = [i for i in range(len(names)) if i not in grouped]
    return ids.transpose(rest + grouped).reshape(-1, math.prod(sizes[i] for i in grouped) if grouped else 1)


MESH_GROUPS = re.compile(r"replica_groups=(mesh\[[^\]]*\](?:, device_ids=\([^)]*\)+)?\s*\{[^}]*\})")


def replica_groups_text(attributes: str) -> str | None:
    """The `replica_groups=` value of an instruction's attributes, whole (the mesh spelling holds commas)."""
    found = MESH_GROUPS.search(attributes)
    if found:
        return found.group(1)
    found = re.search(r"replica_groups=(\{(?:[^{}]|\{[^{}]*\})*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attributes)
    return found.group(1) if found else None


def replica_groups(text: str | None, n_devices: int) -> np.ndarray:
    """Groups of device ids (rows) from a `replica_groups=` attribute in any of XLA's three spellings."""
    if text is None or text.strip() in ("", "{}"):
        return np.arange(n_devices).reshape(1, -1)
    text = text.strip()
    if text.startswith("mesh["):
        return _mesh_groups(text)
    if text.startswith("["):
        return _iota_groups(text)
    rows = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", text[1:-1])]
    return np.array(rows) if rows and rows[0] else np.arange(n_devices).reshape(1, -1)


@dataclass(frozen=True)
class Span:
    chips: int  # in one group
    ici_bytes_per_s: float  # the ring bandwidth B over the axes the group spans inside a slice
    slices: int  # slices one group spans (DCN)
    link_bytes_per_s: float
    dcn_bytes_per_s: float


class Topology:
    """The chips of a target, in the order the compiled program numbers its devices (the mesh's)."""

    def __init__(self, devices, links: ChipLinks):
        self.links = links
        self.coords = np.array([d.coords for d in devices])
        self.slice_of = np.array([getattr(d, "slice_index", 0) for d in devices])
        self.extent = self.coords.max(axis=0) + 1  # chips per physical axis in one slice

    @property
    def n_devices(self) -> int:
        return len(self.coords)

    def span(self, group: np.ndarray) -> Span:
        coords, bandwidth = self.coords[group], 0.0
        for axis in range(coords.shape[1]):
            along = len(set(coords[:, axis]))
            if along > 1:
                # A ring closes through the wraparound only when the group holds the whole axis.
                wraps = along == int(self.extent[axis]) and axis_wraps(self.links.wraps, along)
                bandwidth += self.links.ici_link_bytes_per_s * (2 if wraps else 1)
        return Span(len(group), bandwidth, len(set(self.slice_of[group])), self.links.ici_link_bytes_per_s,
                    self.links.dcn_bytes_per_s)

    def busiest_link(self, pairs: list[tuple[int, int]]) -> int:
        """Most transfers that share one link (one direction) when every (source, target) pair sends at once,
        routed one axis after another, the short way round where the axis wraps. A permute moves its bytes
        that many times over that link; pairs in different slices cross DCN and count once."""
        load: dict[tuple, int] = {}
        for a, b in pairs:
            if self.slice_of[a] != self.slice_of[b]:
                load[("dcn", a)] = load.get(("dcn", a), 0) + 1
                continue
            here = [int(c) for c in self.coords[a]]
            for axis, extent in enumerate(int(e) for e in self.extent):
                d = int(self.coords[b, axis]) - here[axis]
                wraps = axis_wraps(self.links.wraps, extent)
                if wraps and abs(d) > extent // 2:
                    d = d - extent if d > 0 else d + extent
                step = 1 if d > 0 else -1
                for _ in range(abs(d)):
                    link = (axis, tuple(here), step)
                    load[link] = load.get(link, 0) + 1
                    here[axis] = (here[axis] + step) % extent
        return max(load.values(), default=0)


def ring_factor(kind: str, k: int) -> float:
    """Bytes each chip moves over its links per byte of V, by collective (see the module docstring)."""
    if k <= 1:
        return 0.0
    share = (k - 1) / k
    return {"all-gather": share, "reduce-scatter": share, "all-reduce": 2 * share,
            "all-to-all": share * max(1.0, k / 4)}[kind]


def collective_seconds(kind: str, nbytes: float, span: Span) -> float:
    """Time of one collective moving `nbytes` (V: the larger of input and output per chip) over `span`."""
    if span.slices > 1:
        per_slice = span.chips // span.slices
        inside = Span(per_slice, span.ici_bytes_per_s, 1, span.link_bytes_per_s, span.dcn_bytes_per_s)
        # Hierarchical: the ICI part inside each slice, then the slice's share crosses DCN.
        across = ring_factor(kind, span.slices) * nbytes / max(per_slice, 1) / span.dcn_bytes_per_s
        return collective_seconds(kind, nbytes, inside) + across
    if span.chips <= 1 or span.ici_bytes_per_s == 0:
        return 0.0
    return ring_factor(kind, span.chips) * nbytes / span.ici_bytes_per_s
