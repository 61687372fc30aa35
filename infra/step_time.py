"""Predicted step time of a compiled program on a TPU slice: a roofline per op and a cost per collective,
walked in the order the compiler scheduled them.

- An op or fusion takes the larger of its FLOPs at the chip's peak and its HBM bytes at the
  chip's bandwidth (its roofline, a lower bound), or, where the TPU compiler wrote its own cycle
  estimate for the op (`estimated_cycles`, from its cost model of the tiling it chose), that
  estimate at the chip's clock when it is longer. FLOPs are the matmuls (dots and convolutions, the forms XLA:TPU gives them)
  inside it; a custom call's come from `custom_call_flops` (splash attention: its analytic work).
  Bytes are what it reads and writes in HBM: arrays the compiler placed in on-chip memory (a
  layout's S(1) on TPU) cost nothing, a fused parameter only sliced is read as the slice, a
  buffer updated in place is written as the update.
- A collective costs what infra/interconnect.py says for its bytes and the chips its replica
  groups span.
- Overlap is the schedule's: a synchronous collective stalls the chip; an async pair
  (`*-start` ... `*-done`) runs beside the ops scheduled between them and stalls only for what is
  left at the done; a collective the TPU compiler fuses into compute (an async collective fusion,
  one channel split over a chain of fusions) runs beside that chain's compute and stalls at the
  chain's last fusion for what is left. Async copies between memory spaces (prefetches into
  on-chip memory) are taken as hidden.
- A while loop's body counts its trip count times (read from the loop's condition); a
  conditional counts its slowest branch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from infra.hlo import Array, Computation, Instruction, Module, dot_flops
from infra.interconnect import Topology, collective_seconds, replica_groups, replica_groups_text

COLLECTIVES = {"all-gather": "all-gather", "all-reduce": "all-reduce", "reduce-scatter": "reduce-scatter",
               "all-to-all": "all-to-all", "collective-permute": "collective-permute",
               "ragged-all-to-all": "all-to-all"}
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id", "replica-id",
        "after-all", "copy-start", "copy-done", "slice-start", "slice-done", "opt-barrier", "add-dependency"}
SLICING = {"dynamic-slice", "slice", "gather"}


@dataclass
class OpTime:
    name: str
    what: str  # the framework op it came from, or its opcode
    kind: str  # compute, memory or collective
    seconds: float = 0.0  # over every execution in a step
    count: int = 0
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class StepTime:
    compute_s: float  # ops on the chip, each at the larger of its roofline and the compiler's cycle estimate
    roofline_compute_s: float  # the same ops at their rooflines only: a lower bound
    compiler_compute_s: float  # the compiler's own per-op cycle estimates, summed over the schedule
    exposed_communication_s: float  # what collectives add beyond the compute they overlap
    communication_s: float  # every collective's own time, hidden or not
    total_s: float
    flops: float  # per device, counted from the program
    top_ops: list[OpTime] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Walk:
    duration: float = 0.0
    compute: float = 0.0
    roofline: float = 0.0
    compiler: float = 0.0
    exposed: float = 0.0
    communication: float = 0.0
    flops: float = 0.0

    def add(self, other: _Walk, times: float) -> None:
        for key in ("duration", "compute", "roofline", "compiler", "exposed", "communication", "flops"):
            setattr(self, key, getattr(self, key) + times * getattr(other, key))


def _op_label(instruction: Instruction) -> str:
    found = re.search(r'op_name="([^"]*)"', instruction.attributes)
    if not found:
        return instruction.opcode
    parts = [p for p in found.group(1).split("/") if p and not p.startswith(("jit(", "jvp(", "transpose(", "while"))
             and p not in ("body", "closed_call", "checkpoint")]
    return "/".join(parts[-2:]) or instruction.opcode


class StepTimeModel:
    def __init__(self, module: Module, topology: Topology, peak_flops: float,
                 custom_call_flops: Callable[[Instruction, list[Array]], float | None] | None = None,
                 compiler_cycles: bool = True):
        self.module, self.topology, self.peak = module, topology, peak_flops
        self.hbm = topology.links.hbm_bytes_per_s
        self.clock_hz = topology.links.clock_hz if compiler_cycles else None
        self.custom_call_flops = custom_call_flops or (lambda instruction, operands: None)
        self.ops: dict[tuple[str, str], OpTime] = {}

    # ---------------------------------------------------------------- one op

    def _operands(self, instruction: Instruction, computation: Computation) -> list[Array]:
        out = []
        for name in instruction.operands:
            source = computation.by_name.get(name)
            out.extend(source.shape if source is not None else [])
        return out

    def _roofline(self, flops: float, nbytes: float) -> tuple[float, str]:
        compute, memory = flops / self.peak, nbytes / self.hbm
        return (compute, "compute") if compute >= memory else (memory, "memory")

    def fused_flops(self, computation: Computation) -> float:
        total = 0.0
        for i in computation.instructions:
            if i.opcode in ("dot", "convolution"):
                total += dot_flops(i, self._operands(i, computation))
            elif i.opcode == "fusion":
                total += sum(self.fused_flops(c) for c in self.module.called(i))
            elif i.opcode == "custom-call":
                total += self.custom_call_flops(i, self._operands(i, computation)) or 0.0
        return total

    def _parameter_reads(self, fused: Computation, p: Instruction, users: dict[str, list[Instruction]]) -> float:
        """Bytes a fusion reads of one parameter: the slices where it only slices it (a scanned layer's piece of
        a stacked array), looking into nested fusions that do the slicing; nothing where it only updates a slice
        in place or feeds collectives; else the whole array."""
        uses = [u for u in users.get(p.name, []) if u.opcode != "tuple"]
        if not uses or all(u.opcode in COLLECTIVES for u in uses):
            return 0.0
        if all(u.opcode == "dynamic-update-slice" and u.operands[0] == p.name for u in uses):
            return 0.0
        read = 0.0
        for u in uses:
            if u.opcode in SLICING and u.operands[0] == p.name:
                read += u.bytes
            elif u.opcode == "fusion" and self.module.called(u):
                nested = self.module.called(u)[0]
                inner_users: dict[str, list[Instruction]] = {}
                for i in nested.instructions:
                    for name in i.operands:
                        inner_users.setdefault(name, []).append(i)
                params = {i.literal.strip(): i for i in nested.instructions if i.opcode == "parameter"}
                inner = [params.get(str(k)) for k, name in enumerate(u.operands) if name == p.name]
                if any(i is None for i in inner):
                    return p.hbm_bytes
                read += sum(self._parameter_reads(nested, i, inner_users) for i in inner)
            else:
                return p.hbm_bytes
        return min(read, p.hbm_bytes)

    def fusion_bytes(self, instruction: Instruction, fused: Computation) -> float:
        """HBM bytes a fusion reads and writes (see the module docstring)."""
        users: dict[str, list[Instruction]] = {}
        for i in fused.instructions:
            for name in i.operands:
                users.setdefault(name, []).append(i)
        read = 0.0
        for p in (i for i in fused.instructions if i.opcode == "parameter"):
            if p.hbm_bytes == 0:
                continue  # held in on-chip memory
            read += self._parameter_reads(fused, p, users)
        root = fused.root
        written = 0.0
        outputs = instruction.shape if root.opcode == "tuple" else instruction.shape[:1]
        for name, output in zip(root.operands if root.opcode == "tuple" else [root.name], outputs, strict=False):
            if output.hbm_bytes == 0:
                continue
            element = fused.by_name[name]
            while element.opcode == "bitcast" and element.operands[0] in fused.by_name:
                element = fused.by_name[element.operands[0]]
            if element.opcode in ("parameter", *COLLECTIVES):
                continue
            if element.opcode == "dynamic-update-slice":
                written += fused.by_name[element.operands[1]].bytes
            else:
                written += element.bytes
        return read + written

    def _record(self, computation: Computation, instruction: Instruction, kind: str, seconds: float,
                times: float, flops: float = 0.0, nbytes: float = 0.0) -> None:
        key = (computation.name, instruction.name)
        op = self.ops.setdefault(key, OpTime(instruction.name, _op_label(instruction), kind))
        op.seconds += seconds * times
        op.count += int(times)
        op.flops += flops * times
        op.bytes += nbytes * times

    def collective_time(self, instruction: Instruction, computation: Computation, kind: str) -> tuple[float, int]:
        """(seconds, V): V is the larger of the collective's input and output on one chip."""
        operands = self._operands(instruction, computation)
        if kind == "collective-permute":
            pairs = re.findall(r"\{(\d+),(\d+)\}", instruction.attribute("source_target_pairs") or "")
            load = self.topology.busiest_link([(int(a), int(b)) for a, b in pairs if a != b])
            moved = max((a.bytes for a in operands), default=0)
            return load * moved / self.topology.links.ici_link_bytes_per_s, moved
        nbytes = max(sum(a.bytes for a in operands), max((a.bytes for a in instruction.shape), default=0))
        groups = replica_groups(replica_groups_text(instruction.attributes), self.topology.n_devices)
        return collective_seconds(kind, nbytes, self.topology.span(groups[0])), nbytes

    # ---------------------------------------------------------------- a computation, in schedule order

    def trip_count(self, loop: Instruction, computation: Computation) -> int:
        """Iterations of a counted loop: the condition compares a tuple element with a constant; the body adds a
        constant step to that element; the loop's initial tuple gives its start (0 if not a constant)."""
        condition = self.module.computations[loop.attribute("condition").lstrip("%")]
        body = self.module.computations[loop.attribute("body").lstrip("%")]
        compare = condition.root

        def constant(c: Computation, name: str) -> int | None:
            i = c.by_name.get(name)
            return int(i.literal) if i is not None and i.opcode == "constant" and i.literal.lstrip("-").isdigit() else None

        limits = [constant(condition, o) for o in compare.operands]
        counters = [condition.by_name.get(o) for o in compare.operands]
        if compare.opcode != "compare" or not any(v is not None for v in limits):
            return 1
        limit = next(v for v in limits if v is not None)
        counter = next((c for c in counters if c is not None and c.opcode == "get-tuple-element"), None)
        index = int(re.search(r"index=(\d+)", counter.attributes).group(1)) if counter is not None else 0
        init = computation.by_name.get(loop.operands[0])
        start = 0
        if init is not None and init.opcode == "tuple" and index < len(init.operands):
            start = constant(computation, init.operands[index]) or 0
        step = 1
        root = body.root
        if root.opcode == "tuple" and index < len(root.operands):
            update = body.by_name.get(root.operands[index])
            if update is not None and update.opcode == "add":
                step = next((v for v in (constant(body, o) for o in update.operands) if v), 1)
        span = limit - start + (1 if "direction=LE" in compare.attributes else 0)
        return max(1, -(-span // max(step, 1)))

    def walk(self, computation: Computation, times: float, in_flight: frozenset = frozenset()) -> _Walk:
        """One pass over a computation in schedule order. `in_flight`: transfers a caller started and has not
        waited for; their continuation fusions here (the compiler spreads one collective over the steps of a
        collective-matmul loop) are compute beside a transfer already counted."""
        w = _Walk()
        channel_of: dict[str, str] = {}  # an async part (start, continuation fusion, done) -> its transfer
        last: dict[str, int] = {}  # transfer -> the index of its last part: where the chip waits for it
        for index, i in enumerate(computation.instructions):
            channel = self._channel(i, computation, channel_of)
            if channel is not None and channel not in in_flight:
                channel_of[i.name], last[channel] = channel, index
        ends: dict[str, float] = {}  # transfer -> when it completes

        def run(seconds: float, exposed: float = 0.0) -> None:
            w.duration += seconds + exposed
            w.compute += seconds
            w.exposed += exposed

        def communicate(instruction: Instruction, seconds: float, nbytes: int) -> None:
            self._record(computation, instruction, "collective", seconds, times, nbytes=nbytes)
            w.communication += seconds

        for index, i in enumerate(computation.instructions):
            op = i.opcode
            if op in FREE or (op == "custom-call" and "AllocateBuffer" in i.attributes):
                continue
            if op == "while":
                body = self.module.computations[i.attribute("body").lstrip("%")]
                trips = self.trip_count(i, computation)
                w.add(self.walk(body, times * trips, in_flight | frozenset(ends)), trips)
            elif op in ("call", "conditional"):
                branches = [self.walk(c, times, in_flight | frozenset(ends)) for c in self.module.called(i)]
                if branches:
                    w.add(max(branches, key=lambda b: b.duration), 1)
            elif (collective := self._synchronous_collective(i, computation)) is not None:
                seconds, nbytes = self.collective_time(*collective)
                communicate(i, seconds, nbytes)
                run(0.0, seconds)
            elif i.name in channel_of:
                channel = channel_of[i.name]
                if channel not in ends:
                    found = self._collective_in(i, computation)
                    seconds, nbytes = self.collective_time(*found) if found else (0.0, 0)
                    communicate(i, seconds, nbytes)
                    ends[channel] = w.duration + seconds
                if op == "fusion" and not i.name.startswith("async-collective-"):
                    self._compute(i, computation, times, w, run)  # a continuation: compute beside the transfer
                if last[channel] == index:
                    run(0.0, max(0.0, ends.pop(channel) - w.duration))
            else:
                self._compute(i, computation, times, w, run)
        for end in ends.values():  # a transfer still in flight when the computation ends is waited for
            run(0.0, max(0.0, end - w.duration))
        return w

    def _compute(self, i: Instruction, computation: Computation, times: float, w: _Walk, run) -> None:
        if i.opcode == "fusion":
            fused = self.module.called(i)[0]
            flops, nbytes = self.fused_flops(fused), self.fusion_bytes(i, fused)
        else:
            flops = (self.custom_call_flops(i, self._operands(i, computation)) or 0.0) if i.opcode == "custom-call" else 0.0
            nbytes = i.hbm_bytes + sum(a.hbm_bytes for a in self._operands(i, computation))
        roofline, kind = self._roofline(flops, nbytes)
        cycles = re.search(r'"estimated_cycles":"(\d+)"', i.attributes)
        compiler = int(cycles.group(1)) / self.clock_hz if cycles and self.clock_hz else roofline
        seconds = max(roofline, compiler)
        self._record(computation, i, kind, seconds, times, flops, nbytes)
        w.flops += flops
        w.roofline += roofline
        w.compiler += compiler
        run(seconds)

    def _collective_in(self, i: Instruction, computation: Computation):
        """(collective instruction, its computation, kind) for the transfer `i` starts or carries, or None."""
        base = i.opcode.removesuffix("-start")
        if base in COLLECTIVES:
            return i, computation, COLLECTIVES[base]
        for called in self.module.called(i):
            for inner in called.instructions:
                if inner.opcode in COLLECTIVES:
                    kind = "reduce-scatter" if called.root.opcode == "dynamic-slice" else COLLECTIVES[inner.opcode]
                    return inner, called, kind
                if inner.opcode == "fusion" and (deeper := self._collective_in(inner, called)) is not None:
                    return deeper
        return None

    def _synchronous_collective(self, i: Instruction, computation: Computation):
        """A collective the chip waits for where it stands: a plain collective op, or one the TPU compiler emits
        as its own fusion (a reduce-scatter as all-reduce + slice, kind=kCustom)."""
        if i.opcode in COLLECTIVES:
            return i, computation, COLLECTIVES[i.opcode]
        if i.opcode == "fusion" and "kind=kCustom" in i.attributes and not i.name.startswith("async-collective-"):
            return self._collective_in(i, computation)
        return None

    def _channel(self, i: Instruction, computation: Computation, known: dict[str, str]) -> str | None:
        """The transfer an async part belongs to: its collective's channel, or for a done the start's."""
        if i.opcode in COLLECTIVES or (i.opcode == "fusion" and "kind=kCustom" in i.attributes
                                        and not i.name.startswith("async-collective-")):
            return None  # synchronous
        if i.opcode.endswith("-done") or i.name.startswith("async-collective-done"):
            for name in i.operands:
                source = computation.by_name.get(name)
                while source is not None and source.name not in known and source.opcode == "get-tuple-element":
                    source = computation.by_name.get(source.operands[0])
                if source is not None and source.name in known:
                    return known[source.name]
            if i.opcode != "fusion":
                return None
            # A done fed through a loop's outputs: its fusion names the collective (and channel) it completes.
        if not (i.opcode.endswith("-start") or i.opcode == "fusion"):
            return None
        found = self._collective_in(i, computation)
        if found is None:
            return None
        channel = re.search(r"channel_id=(\d+)", found[0].attributes)
        return f"channel {channel.group(1)}" if channel else i.name

    def estimate(self, top: int = 10) -> StepTime:
        self.ops = {}
        w = self.walk(self.module.computations[self.module.entry], 1)
        ops = sorted(self.ops.values(), key=lambda o: o.seconds, reverse=True)[:top]
        return StepTime(w.compute, w.roofline, w.compiler, w.exposed, w.communication, w.duration, w.flops, ops)
