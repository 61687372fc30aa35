"""The shipped image-caption generators: deterministic, pixels that agree with their captions, held-out
splits by composition (shapes) or by image (digits), and no silent overwrite."""

import itertools
import json
import random
from collections import deque

import numpy as np
import pytest
from PIL import Image

from train.data import image_synth
from train.data.image_synth import COLOURS, COUNT_WORDS, POSITIONS, digits, shapes

WORD_COUNTS = {word: n for n, word in COUNT_WORDS.items()}


def records(out):
    return [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]


def pixels(out, record):
    return np.asarray(Image.open(out / record["image"]))


def blobs(image: np.ndarray) -> int:
    """Connected groups of non-black pixels (8-neighbour flood fill)."""
    todo, seen, found = image.any(-1), set(), 0
    for start in zip(*np.nonzero(todo)):
        if start in seen:
            continue
        found += 1
        queue = deque([start])
        seen.add(start)
        while queue:
            y, x = queue.popleft()
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                near = (y + dy, x + dx)
                if 0 <= near[0] < todo.shape[0] and 0 <= near[1] < todo.shape[1] and todo[near] and near not in seen:
                    seen.add(near)
                    queue.append(near)
    return found


@pytest.fixture(scope="module")
def shapes_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    summary = shapes(out, count=300, seed=3)  # one full pass over the 288 compositions, then a few more
    return out, summary


def test_shapes_summary_and_classes(shapes_out):
    out, summary = shapes_out
    lines = records(out)
    classes = json.loads((out / "classes.json").read_text())
    assert classes["templates"][0] == "a {}" and len(classes["classes"]) == 12 == summary["classes"]
    assert summary == {"images": 300, "train": sum(r["split"] == "train" for r in lines),
                       "heldout": sum(r["split"] == "heldout" for r in lines), "classes": 12, "out": str(out)}
    assert summary["train"] > 0 and summary["heldout"] > 0
    assert {r["label"] for r in lines} == set(classes["classes"])  # every class appears, and only those
    assert [r["image"] for r in lines] == [f"images/{i:05d}.png" for i in range(300)]
    assert list(lines[0]) == ["image", "text", "label", "split", "composition"]
    assert len({r["composition"] for r in lines}) == 288


def test_shapes_are_deterministic(tmp_path):
    first, again, other = (tmp_path / "a", 0), (tmp_path / "b", 0), (tmp_path / "c", 1)
    for out, seed in (first, again, other):
        shapes(out, count=40, seed=seed)
    a, b, c = (out / "captions.jsonl" for out, _ in (first, again, other))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    for i in (0, 7, 39):
        name = f"images/{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(first[0] / name)), np.asarray(Image.open(again[0] / name)))
    assert any(not np.array_equal(np.asarray(Image.open(first[0] / f"images/{i:05d}.png")),
                                  np.asarray(Image.open(other[0] / f"images/{i:05d}.png"))) for i in range(40))


def test_shapes_hold_out_whole_compositions(shapes_out):
    out, _ = shapes_out
    lines = records(out)
    train = {r["composition"] for r in lines if r["split"] == "train"}
    heldout = {r["composition"] for r in lines if r["split"] == "heldout"}
    assert train and heldout and not train & heldout
    assert 0.1 < len(heldout) / 288 < 0.3  # about the default fraction 0.2
    for r in lines:  # the split follows from the composition alone
        shape, colour, size, position, count = r["composition"].split("|")
        assert (r["split"] == "heldout") == image_synth.is_heldout((shape, colour, size, position, int(count)), 0.2)
    trained_classes = {r["label"] for r in lines if r["split"] == "train"}
    assert len(trained_classes) == 12


def test_shapes_captions_follow_the_grammar(shapes_out):
    out, _ = shapes_out
    lines = records(out)
    for r in lines:
        shape, colour, size, position, count = r["composition"].split("|")
        words = r["text"].split()
        assert r["label"] == f"{colour} {shape}"
        assert WORD_COUNTS[words[0]] == int(count)
        noun = shape if count == "1" else shape + "s"
        assert r["text"] in {f"{words[0]} {middle}{noun}{tail}" for middle in (f"{size} {colour} ", f"{colour} ")
                             for tail in ("", f" in the {position}")}
    texts = [r["text"] for r in lines]
    assert any(len(t.split()) == 3 for t in texts)  # short forms: "a blue square"
    assert any(" in the " in t and (" small " in t or " large " in t) for t in texts)  # full forms
    assert any(t.startswith("two ") for t in texts) and any(t.startswith("three ") for t in texts)


def test_shapes_pixels_agree_with_captions(shapes_out):
    out, _ = shapes_out
    for r in records(out):
        image = pixels(out, r)
        shape, colour, size, position, count = r["composition"].split("|")
        colour_word = next(w for w in r["text"].split() if w in COLOURS)
        lit = image.any(-1)
        assert {tuple(p) for p in image[lit]} == {COLOURS[colour_word]}
        assert blobs(image) == int(count), r
        rows, cols = np.nonzero(lit)  # everything lies in the caption's quadrant
        half = image.shape[0] // 2
        assert (rows < half).all() if "top" in position else (rows >= half).all()
        assert (cols < half).all() if "left" in position else (cols >= half).all()


@pytest.mark.parametrize("size", [16, 33])
def test_copies_never_touch_at_other_sizes(size):
    rng = random.Random(0)
    for composition in itertools.product(image_synth.SHAPES, COLOURS, image_synth.SIZES, POSITIONS, (1, 2, 3)):
        image = np.asarray(image_synth._draw(composition, size, rng))
        assert image.shape == (size, size, 3) and blobs(image) == composition[-1], composition


def test_large_copies_are_bigger_than_small_ones():
    rng = random.Random(0)
    area = {s: np.asarray(image_synth._draw(("square", "red", s, "top left", 1), 24, rng)).any(-1).sum()
            for s in ("small", "large")}
    assert area["small"] < area["large"]


def test_shapes_refuse_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction .* holds out every composition of"):
        shapes(tmp_path / "a", count=10, heldout_fraction=0.999)
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \[0, 1\), got 1"):
        shapes(tmp_path / "b", count=10, heldout_fraction=1)
    with pytest.raises(ValueError, match="size at least 16"):
        shapes(tmp_path / "c", count=10, size=8)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("kind", ["shapes", "digits"])
def test_an_existing_dataset_is_never_overwritten(tmp_path, kind):
    def make(out):
        return shapes(out, count=5) if kind == "shapes" else digits(out, heldout=10)

    make(tmp_path)
    before = (tmp_path / "captions.jsonl").read_bytes()
    with pytest.raises(ValueError, match=f"{tmp_path} already holds a dataset"):
        make(tmp_path)
    assert (tmp_path / "captions.jsonl").read_bytes() == before


def test_digits_match_scikit_learn(tmp_path):
    from sklearn import datasets
    data = datasets.load_digits()
    summary = digits(tmp_path / "d", heldout=400, seed=0)
    out = tmp_path / "d"
    lines = records(out)
    assert summary == {"images": 1797, "train": 1397, "heldout": 400, "classes": 10, "out": str(out)}
    assert len(lines) == 1797 and sum(r["split"] == "heldout" for r in lines) == 400
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert json.loads((out / "classes.json").read_text()) == {"templates": ["a handwritten digit {}"], "classes": words}
    for i in (0, 1, 500, 1796):
        image = pixels(out, lines[i])
        assert image.shape == (8, 8, 3) and (image == image[..., :1]).all()  # gray, stored as RGB
        assert np.array_equal(image[..., 0], np.round(data.images[i] * 255 / 16).astype(np.uint8))
        word = words[data.target[i]]
        assert lines[i]["label"] == word and lines[i]["text"] == f"a handwritten digit {word}"
    other = digits(tmp_path / "e", heldout=400, seed=1)
    assert other["heldout"] == 400
    assert [r["split"] for r in records(tmp_path / "e")] != [r["split"] for r in lines]


def test_digits_resize_and_bad_arguments(tmp_path):
    from sklearn import datasets
    digits(tmp_path / "big", heldout=100, size=16)
    first = np.asarray(Image.open(tmp_path / "big" / "images" / "00000.png"))[..., 0]
    expected = np.round(datasets.load_digits().images[0] * 255 / 16).astype(np.uint8)
    assert np.array_equal(first, np.kron(expected, np.ones((2, 2), np.uint8)))  # nearest neighbour
    for bad in (0, 1797):
        with pytest.raises(ValueError, match=f"heldout must be between 1 and 1796, got {bad}"):
            digits(tmp_path / f"bad{bad}", heldout=bad)
