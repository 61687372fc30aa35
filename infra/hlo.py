"""Read a compiled program's optimized HLO text: computations, instructions, shapes, and the work each does.

Only what the step-time model needs is parsed: each instruction's name, opcode, result shape
(with each array's memory space), operands, the computations it calls and its attributes as
text. Sizes are logical (element count x element size); the layout's tile padding is not
counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

ELEMENT_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
                 "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                 "f64": 8, "c64": 8, "c128": 16}


@dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]
    memory_space: int = 0  # the layout's S(n): 0 is HBM; on TPU 1 is the on-chip vector memory (VMEM)

    @property
    def bytes(self) -> int:
        return math.prod(self.dims) * ELEMENT_BYTES.get(self.dtype, 0)

    @property
    def hbm_bytes(self) -> int:
        return self.bytes if self.memory_space == 0 else 0


_ARRAY_WITH_LAYOUT = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^{}]*\})?")


def parse_shape(text: str) -> list[Array]:
    """Every array in a shape (one, or a tuple's elements), with the memory space its layout names."""
    out = []
    for dtype, dims, layout in _ARRAY_WITH_LAYOUT.findall(text):
        if dtype in ELEMENT_BYTES:
            space = re.search(r"S\((\d+)\)", layout)
            out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
    return out


@dataclass
class Instruction:
    name: str
    opcode: str
    shape: list[Array]
    operands: list[str]
    attributes: str
    calls: list[str] = field(default_factory=list)
    literal: str = ""  # a constant's value as written; a parameter's number

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.shape)

    @property
    def hbm_bytes(self) -> int:
        return sum(a.hbm_bytes for a in self.shape)

    def attribute(self, key: str) -> str | None:
        """The text of `key=...` up to its balanced end (braces or brackets), or None."""
        at = re.search(rf"(?:^|[ ,]){re.escape(key)}=", self.attributes)
        return None if at is None else _balanced(self.attributes, at.end())


@dataclass
class Computation:
    name: str
    instructions: list[Instruction]  # in schedule order: the compiled module is scheduled
    root_name: str | None = None

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}

    @property
    def root(self) -> Instruction:
        return self.instructions[-1] if self.root_name is None else self.by_name[self.root_name]


@dataclass
class Module:
    computations: dict[str, Computation]
    entry: str

    def called(self, instruction: Instruction) -> list[Computation]:
        return [self.computations[c] for c in instruction.calls if c in self.computations]


def _balanced(text: str, start: int) -> str:
    """From `start`, the text up to the first top-level comma or the end, keeping nested brackets whole."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        elif ch == '"':
            i = text.index('"', i + 1)
        elif ch == "," and depth == 0:
            break
        i += 1
    return text[start:i].strip()


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced HLO text: {text[start:start + 80]}")


_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_LINE = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = ")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)=\{?([^}\s]*)\}?")


def parse_instruction(line: str) -> tuple[Instruction, bool] | None:
    head = _LINE.match(line)
    if head is None:
        return None
    rest = line[head.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape_text, rest = rest[:end], rest[end:].lstrip()
    else:
        shape_text, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    close = _matching("(" + rest, 0) - 1
    operand_text, attributes = rest[:close - 1], rest[close:].lstrip(", ")
    operands = re.findall(r"%([\w.\-]+)", operand_text)
    calls = [name.lstrip("%") for group in _CALLS.findall(attributes) for name in group.split(",") if name]
    literal = operand_text if opcode in ("constant", "parameter") else ""
    instruction = Instruction(head.group(2), opcode, parse_shape(shape_text), operands, attributes, calls, literal)
    return instruction, bool(head.group(1))


def _logical_lines(text: str):
    """Lines of the module with an instruction's continuation lines (a kernel's metadata may hold newlines)
    joined to it."""
    held = None
    for line in text.splitlines():
        starts = line.strip() == "}" or _LINE.match(line) or _HEADER.match(line) and not line.startswith((" ", "}"))
        if starts or held is None:
            if held is not None:
                yield held
            held = line
        else:
            held += " " + line
    if held is not None:
        yield held


def parse_module(text: str) -> Module:
    computations: dict[str, Computation] = {}
    entry, current, body, root = None, None, [], None
    for line in _logical_lines(text):
        if current is None:
            header = _HEADER.match(line)
            if header and "(" in line:
                current, body, root = header.group(2), [], None
                if header.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            computations[current] = Computation(current, body, root)
            current = None
            continue
        parsed = parse_instruction(line)
        if parsed is not None:
            instruction, is_root = parsed
            body.append(instruction)
            if is_root:
                root = instruction.name
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(computations, entry)


def dot_flops(instruction: Instruction, operand_shapes: list[Array]) -> float:
    """Multiply-adds x 2 of a dot or convolution (the forms XLA:TPU gives matmuls)."""
    out = math.prod(instruction.shape[0].dims)
    if instruction.opcode == "dot":
        lhs = operand_shapes[0].dims
        contracting = instruction.attribute("lhs_contracting_dims") or "{}"
        dims = [int(d) for d in contracting.strip("{}").split(",") if d]
        return 2.0 * out * math.prod(lhs[d] for d in dims)
    if instruction.opcode == "convolution":
        return convolution_flops(instruction, operand_shapes[0].dims, operand_shapes[1].dims)
    return 0.0


def _window_field(window: str, key: str, n: int, default: int) -> list[list[int]]:
    found = re.search(rf"{key}=([\d_x-]+)", window)
    if not found:
        return [[default, default] for _ in range(n)]
    return [[int(v) for v in part.split("_")] for part in found.group(1).split("x")]


def convolution_flops(instruction: Instruction, lhs: tuple[int, ...], rhs: tuple[int, ...]) -> float:
    """2 x batch x output features x input features per group x, along each spatial axis, the (output, tap)
    pairs that land on real input: XLA:TPU writes some matmuls as convolutions whose padding turns an axis
    into a batch (a window of 32 over one real element takes one product per output, not 32)."""
    lhs_labels, rest = (instruction.attribute("dim_labels") or "_->").split("_")
    rhs_labels, out_labels = rest.split("->")
    out = instruction.shape[0].dims
    window = instruction.attribute("window") or ""
    spatial = sorted(c for c in out_labels if c.isdigit())
    pads = _window_field(window, "pad", len(spatial), 0)
    strides = _window_field(window, "stride", len(spatial), 1)
    lhs_dilation = _window_field(window, "lhs_dilate", len(spatial), 1)
    rhs_dilation = _window_field(window, "rhs_dilate", len(spatial), 1)
    pairs = 1
    for n, axis in enumerate(spatial):
        n_in, taps, n_out = lhs[lhs_labels.index(axis)], rhs[rhs_labels.index(axis)], out[out_labels.index(axis)]
        o = np.arange(n_out)[:, None] * strides[n][0]
        k = np.arange(taps)[None, :] * rhs_dilation[n][0]
        position = o + k - pads[n][0]  # in the dilated input
        dilate = lhs_dilation[n][0]
        real = (position >= 0) & (position <= (n_in - 1) * dilate) & (position % dilate == 0)
        pairs *= int(real.sum())
    batch, features = out[out_labels.index("b")], out[out_labels.index("f")]
    return 2.0 * batch * features * rhs[rhs_labels.index("i")] * pairs
