"""Image-text pairs for a dual encoder: JSONL files of (image path, caption) records, split into training and
held-out pairs, read as rows of uint8 pixels and caption tokens inside the grain pipeline.

Opening the data reads every JSONL line and decodes every image once, so a bad record is found before
training starts: a line that is not JSON, a caption or image field that is missing, an image file that does
not exist or does not decode. Each is skipped and counted by cause, never a crash. A record's `split` field
("train" or "heldout") places it; without one, a hash of its image path does (data.heldout_fraction).

Rows are decoded and resized again when a batch is read: images are converted to the model's channels and
resized to its image size (bicubic), captions tokenized with the end token last and padded. No augmentation.
Training rows run through a seeded permutation of the training pairs per epoch; held-out rows in file order.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from train.config import ConfigError, ExperimentConfig
from train.data.sources import FileSource, is_heldout
from train.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Pair:
    image: Path
    text: str
    label: str | None = None


def open_image(path: Path, size: int, channels: int) -> np.ndarray:
    """The image as uint8 [size, size, channels]: converted (grey or RGB(A)) and resized (bicubic)."""
    from PIL import Image

    with Image.open(path) as image:
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, "RGB")
        image = image.convert(mode)
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, np.uint8)
    return pixels.reshape(size, size, -1)[..., :channels]


def image_problem(path: Path) -> str | None:
    """None if the file decodes as an image, else the cause of the skip."""
    from PIL import Image

    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as image:
            image.load()
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...) for bad files
        return "unreadable_image"
    return None


def _pair_of(line: bytes, base: Path, text_field: str, image_field: str) -> tuple[Pair | None, str | None, str | None]:
    """(pair, its split or None, None) or (None, None, the problem)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, None, "bad_json"
    if not isinstance(record, dict):
        return None, None, "bad_json"
    text, image = record.get(text_field), record.get(image_field)
    if not isinstance(text, str) or not text.strip():
        return None, None, "missing_caption"
    if not isinstance(image, str) or not image:
        return None, None, "missing_image_field"
    split = record.get("split")
    if split is not None and split not in SPLITS:
        return None, None, "bad_split"
    path = Path(image) if Path(image).is_absolute() else base / image
    problem = image_problem(path)
    if problem:
        return None, None, problem
    label = record.get("label")
    return Pair(path, text, label if isinstance(label, str) else None), split, None


@dataclass
class ImageTextPairs:
    """The pairs of an experiment's JSONL files, split, with the records skipped by cause."""

    train: list[Pair]
    heldout: list[Pair]
    skipped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, paths: list[str], text_field: str, image_field: str, heldout_fraction: float) -> "ImageTextPairs":
        pairs = cls([], [])
        for file in FileSource("jsonl", tuple(paths)).files():
            with open(file, "rb") as lines:
                for number, line in enumerate(lines):
                    if not line.strip():
                        continue
                    pair, split, problem = _pair_of(line, file.parent, text_field, image_field)
                    if pair is None:
                        pairs.skipped[problem] = pairs.skipped.get(problem, 0) + 1
                        continue
                    if split is None:
                        split = "heldout" if is_heldout(str(pair.image), heldout_fraction) else "train"
                    (pairs.heldout if split == "heldout" else pairs.train).append(pair)
        return pairs


class PairRows:
    """Rows of one split: element k of the stream is pair order[k mod n] of epoch k // n, read on demand."""

    def __init__(self, pairs: list[Pair], tokenizer: Tokenizer, seq_len: int, image_size: int, channels: int,
                 seed: int | None):
        self.pairs, self.tokenizer, self.seq_len = pairs, tokenizer, seq_len
        self.image_size, self.channels, self.seed = image_size, channels, seed
        self.n_rows = len(pairs)

    def order(self, row: int) -> int:
        if self.seed is None:
            return row % self.n_rows
        return int(self._permutation(row // self.n_rows)[row % self.n_rows])

    @functools.lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        pairs = [self.pairs[self.order(int(i))] for i in index]
        tokens, lengths = tokenized_captions(self.tokenizer, [p.text for p in pairs], self.seq_len)
        images = np.stack([open_image(p.image, self.image_size, self.channels) for p in pairs])
        return {"images": images, "tokens": tokens, "lengths": lengths}


def caption_tokens(tokenizer: Tokenizer, text: str, seq_len: int) -> np.ndarray:
    """A caption's tokens, cut to leave room for the end token, which comes last (the text tower reads it). A
    tokenizer that adds it itself (CLIP's: start and end tokens around the text) has it once."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if len(ids) and ids[-1] == tokenizer.eod_id:
        ids = ids[:-1]
    return np.append(ids[: seq_len - 1], np.int32(tokenizer.eod_id))


def tokenized_captions(tokenizer: Tokenizer, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n, seq_len], lengths [n]) of captions or prompts, as the data pipeline lays them out."""
    tokens = np.full((len(texts), seq_len), tokenizer.pad_id, np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for i, text in enumerate(texts):
        ids = caption_tokens(tokenizer, text, seq_len)
        tokens[i, : len(ids)], lengths[i] = ids, len(ids)
    return tokens, lengths


@dataclass
class ImageTextData:
    """An experiment's image-text pairs, ready to read: the tokenizer, each split's rows, the skips."""

    tokenizer: Tokenizer
    pairs: ImageTextPairs
    train: PairRows
    heldout: PairRows
    sources: list[str]  # one name per JSONL glob (the loop logs one share per source)


def load_image_text(cfg: ExperimentConfig) -> ImageTextData:
    """The config's pairs; user errors (no usable pairs, a split left empty, a small vocabulary) raise ConfigError."""
    data, vision = cfg.data, cfg.model.clip.vision
    if not data.paths:  # allowed in a run's config (an imported model has none yet); needed to read pairs
        raise ConfigError("data.paths is empty; data.source='images' needs at least one JSONL file glob of image-text "
                          "pairs (data.paths=[pairs.jsonl])")
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens; set model.vocab_size>={tokenizer.vocab_size}")
    pairs = ImageTextPairs.read(data.paths, data.text_field, data.image_field, data.heldout_fraction)
    if data.max_documents is not None:
        pairs.train = pairs.train[: data.max_documents]
    if not pairs.train or not pairs.heldout:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(pairs.skipped.items())) or "none"
        raise ConfigError(
            f"data.paths={data.paths} gave {len(pairs.train)} training and {len(pairs.heldout)} held-out image-text "
            f"pairs (skipped: {skipped}); both need at least one: check data.image_field={data.image_field!r}, "
            f"data.text_field={data.text_field!r} and the records' split fields or data.heldout_fraction"
        )

    def rows(split: list[Pair], seed: int | None) -> PairRows:
        return PairRows(split, tokenizer, data.seq_len, vision.image_size, vision.channels, seed)

    return ImageTextData(tokenizer, pairs, rows(pairs.train, cfg.run.seed), rows(pairs.heldout, None), list(data.paths))


def check_same_pairs(data: ImageTextData) -> None:
    """Every process reads the JSONL files itself: they must list the same pairs, or the processes' rows of one
    global batch would come from different data."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    listing = json.dumps([[p.text, str(p.image)] for p in data.pairs.train + data.pairs.heldout])
    try:
        multihost_utils.assert_equal(np.frombuffer(hashlib.sha256(listing.encode()).digest(), np.uint32), "")
    except AssertionError:
        raise ConfigError(f"the processes read different image-text pairs from data.paths={data.sources}; give "
                          "every host the same files (a shared filesystem)") from None


def read_classes(path: str) -> tuple[list[str], list[list[str]]]:
    """(class names, each class's prompts) of a classes.json: {"templates": ["a photo of a {}", ...], "classes":
    [...]} (or one "template"). Several templates are an ensemble: a class's embedding is their mean."""
    try:
        spec = json.loads(Path(path).read_text())
        names = [str(c) for c in spec["classes"]]
        templates = spec["templates"] if "templates" in spec else [spec.get("template", "{}")]
        prompts = [[str(t).format(name) for t in templates] for name in names]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{path} is not a classes file ({type(e).__name__}: {str(e)[:80]}); it holds "
                          '{"templates": ["a photo of a {}"], "classes": ["cat", "dog", ...]}') from None
    if len(names) < 2 or len(set(names)) < len(names) or not templates:
        raise ConfigError(f"{path} lists {len(names)} classes ({len(set(names))} distinct) and {len(templates)} "
                          "templates; zero-shot classification needs two distinct classes and a template")
    return names, prompts
