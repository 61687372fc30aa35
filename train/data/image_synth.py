"""Seeded image-caption datasets for a tiny CLIP-style dual encoder, made on the CPU with no download.

On disk (what the image-text data readers expect):
- `OUT/images/NNNNN.png`: RGB PNGs.
- `OUT/captions.jsonl`: one line per image, `{"image": "images/00000.png", "text": caption, "label": class
  name, "split": "train" | "heldout"}`; shapes lines also carry `"composition": "shape|colour|size|position|
  count"`, the attributes that decide the held-out split.
- `OUT/classes.json`: `{"templates": ["a {}", ...], "classes": [...]}`, the zero-shot classes; every label is
  one of them, and `template.format(name)` for each template are a class's prompts.

`shapes` draws compositional scenes and holds out whole compositions, so zero-shot accuracy on the held-out
split measures generalisation to unseen attribute combinations; `digits` writes scikit-learn's bundled 8x8
handwritten digits, a small real-image set with a random held-out split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from train.config import OptionError

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # the image's four quadrants
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
SHAPE_TEMPLATES = ["a {}", "a small {}", "a large {}", "two {}s", "three {}s"]
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
Composition = tuple[str, str, str, str, int]  # shape, colour, size, position, count
Example = tuple[Image.Image, dict]  # an image and its captions.jsonl fields (the image path aside)


def _write_dataset(out: str | Path, examples: Iterator[Example], templates: list[str], classes: list[str]) -> dict:
    """Write images, classes.json and captions.jsonl (last, so an interrupted run can be repeated); refuse
    a directory that already holds a dataset rather than overwrite it."""
    out = Path(out)
    if (out / "captions.jsonl").exists():
        raise OptionError("{out}: {path} already holds a dataset (captions.jsonl); choose a new directory",
                          path=str(out))
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines, splits = [], {"train": 0, "heldout": 0}
    for i, (image, fields) in enumerate(examples):
        name = f"images/{i:05d}.png"
        image.convert("RGB").save(out / name, format="PNG")
        assert fields["label"] in classes, fields
        lines.append(json.dumps({"image": name, **fields}) + "\n")
        splits[fields["split"]] += 1
    (out / "classes.json").write_text(json.dumps({"templates": templates, "classes": classes}, indent=1) + "\n")
    (out / "captions.jsonl.partial").write_text("".join(lines), encoding="utf-8")
    (out / "captions.jsonl.partial").replace(out / "captions.jsonl")
    return {"images": len(lines), **splits, "classes": len(classes), "out": str(out)}


def composition_key(composition: Composition) -> str:
    return "|".join(str(part) for part in composition)


def is_heldout(composition: Composition, fraction: float) -> bool:
    """Whether a composition is held out: a stable hash of it (not Python's salted hash()) below fraction,
    so the same compositions are held out for every seed and image count."""
    digest = hashlib.sha256(composition_key(composition).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def caption(composition: Composition, rng: random.Random) -> str:
    """English for a composition; size and position are each dropped half the time, so short forms
    ("a blue square") appear next to full ones ("two small red circles in the top left")."""
    shape, colour, size, position, count = composition
    words = [COUNT_WORDS[count]] + ([size] if rng.random() < 0.5 else []) + [colour, shape + "s" * (count > 1)]
    if rng.random() < 0.5:
        words.append(f"in the {position}")
    return " ".join(words)


def _draw(composition: Composition, size: int, rng: random.Random) -> Image.Image:
    """Each copy sits in its own cell of the quadrant's 2x2 grid, never in the cell's last row or column,
    so copies never touch (not even diagonally) and every copy is one connected blob."""
    shape, colour, size_word, position, count = composition
    cell = size // 4
    side = cell - 1 if size_word == "large" else max(2, round((cell - 1) * 0.6))
    top, left = (0 if "top" in position else 2 * cell), (0 if "left" in position else 2 * cell)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for row, col in rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], count):
        x = left + col * cell + rng.randint(0, cell - 1 - side)
        y = top + row * cell + rng.randint(0, cell - 1 - side)
        box = (x, y, x + side - 1, y + side - 1)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y + side - 1), (x + side - 1, y + side - 1), (x + (side - 1) / 2, y)],
                         fill=COLOURS[colour])
    return image


def shapes(out: str | Path, count: int = 4000, seed: int = 0, size: int = 24,
           heldout_fraction: float = 0.2) -> dict:
    """Compositional scenes (1-3 copies of one coloured shape, small or large, in one quadrant) with
    captions; zero-shot classes are "<colour> <shape>", and whole compositions are held out."""
    if count < 1 or size < 16:
        raise OptionError("{count} must be at least 1 and {size} at least 16, got {c} and {s}", c=count, s=size)
    if not 0 <= heldout_fraction < 1:
        raise OptionError("{heldout_fraction} must be in [0, 1), got {f}", f=heldout_fraction)
    compositions = list(itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, COUNTS))
    for shape, colour in itertools.product(SHAPES, COLOURS):
        if all(is_heldout(c, heldout_fraction) for c in compositions if c[:2] == (shape, colour)):
            raise OptionError("{heldout_fraction} {f} holds out every composition of '{name}', which then has "
                              "no training images; use a smaller one", f=heldout_fraction, name=f"{colour} {shape}")
    rng = random.Random(seed)

    def examples() -> Iterator[Example]:
        order: list[Composition] = []
        for _ in range(count):
            if not order:  # every composition once per pass, in a seeded order
                order = rng.sample(compositions, len(compositions))
            composition = order.pop()
            split = "heldout" if is_heldout(composition, heldout_fraction) else "train"
            yield _draw(composition, size, rng), {
                "text": caption(composition, rng), "label": f"{composition[1]} {composition[0]}", "split": split,
                "composition": composition_key(composition)}

    classes = [f"{colour} {shape}" for colour, shape in itertools.product(COLOURS, SHAPES)]
    # Zero-shot prompts: one per count and size, averaged per class (CLIP's prompt ensembling).
    return _write_dataset(out, examples(), SHAPE_TEMPLATES, classes)


def digits(out: str | Path, heldout: int = 400, seed: int = 0, size: int = 8) -> dict:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped in its wheel) as captioned
    images; a seeded permutation holds out `heldout` of them."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise OptionError("digits needs scikit-learn: pip install scikit-learn") from error
    data = load_digits()
    total = len(data.target)
    if not 0 < heldout < total:
        raise OptionError("{heldout} must be between 1 and {most}, got {h}", most=total - 1, h=heldout)
    if size < 1:
        raise OptionError("{size} must be at least 1, got {s}", s=size)
    held = set(np.random.default_rng(seed).permutation(total)[:heldout].tolist())

    def examples() -> Iterator[Example]:
        for i, (pixels, target) in enumerate(zip(data.images, data.target)):
            image = Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8))
            if size != 8:
                image = image.resize((size, size), Image.Resampling.NEAREST)
            word = DIGIT_WORDS[int(target)]
            yield image, {"text": f"a handwritten digit {word}", "label": word,
                          "split": "heldout" if i in held else "train"}

    return _write_dataset(out, examples(), ["a handwritten digit {}"], list(DIGIT_WORDS))
