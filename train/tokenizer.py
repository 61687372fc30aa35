"""Tokenizers: byte-level (built in, nothing to download) and BPE through HF `tokenizers`.

Both expose the same small surface: encode/decode, the special-token ids the data
pipeline needs, each token's UTF-8 bytes (for constrained decoding and stop strings),
and bytes and characters per token (for bits per byte and per character).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from train.config import ConfigError, OptionError, first_line

SPECIAL_TOKENS = ("<pad>", "<eod>", "<mask>", "<cls>", "<sep>")
# Names other tokenizers use for the end-of-document token, tried in order.
EOD_ALIASES = ("<eod>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class TokenizerError(ConfigError):
    """A tokenizer file that cannot be used, or a vocabulary that cannot be trained; a user error."""


def char_starts(strings: list[bytes]) -> np.ndarray:
    """Characters per token, counted as the bytes that start a UTF-8 character (not 0b10xxxxxx).

    Additive over tokens even when a token boundary splits a character, so the characters
    of any set of predicted tokens are exact (for bits per character)."""
    return np.array([sum((c & 0xC0) != 0x80 for c in b) for b in strings], dtype=np.int32)


class _PerTokenCounts:
    """Bytes and characters per token, from a tokenizer's `token_byte_strings`."""

    token_byte_strings: list[bytes]

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes per token (for bits per byte)."""
        return np.array([len(b) for b in self.token_byte_strings], dtype=np.int32)

    @cached_property
    def token_chars(self) -> np.ndarray:
        return char_starts(self.token_byte_strings)


class ByteTokenizer(_PerTokenCounts):
    """Ids 0..255 are the UTF-8 bytes; special tokens follow."""

    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.pad_id = self.special["<pad>"]
        self.eod_id = self.special["<eod>"]

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @cached_property
    def token_byte_strings(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b""] * len(SPECIAL_TOKENS)


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character that byte-level BPE uses for each byte (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class BpeTokenizer(_PerTokenCounts):
    """A `tokenizer.json` loaded with HF `tokenizers`."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"data.tokenizer={str(path)!r}: no such file; use 'byte' or the path of a tokenizer.json "
                "(make one with `tessera tokenizer train`)"
            )
        self.path = path
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for any malformed file
            reason = first_line(e, 160)
            raise TokenizerError(f"data.tokenizer={str(path)!r} is not a valid tokenizer.json ({reason})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eod = next((self._tok.token_to_id(t) for t in EOD_ALIASES if self._tok.token_to_id(t) is not None), None)
        if eod is None:
            raise TokenizerError(f"{path} has no end-of-document token; add one of {', '.join(EOD_ALIASES)}")
        self.eod_id = eod
        pad = self._tok.token_to_id("<pad>")
        self.pad_id = eod if pad is None else pad  # padding only fills the corpus tail, with zero loss weight
        self.special = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is not None}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    @cached_property
    def token_byte_strings(self) -> list[bytes]:
        """The UTF-8 bytes each token stands for (empty for special tokens)."""
        alphabet = _byte_level_alphabet()
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        strings = [b""] * self.vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if token in specials:
                continue
            if all(c in alphabet for c in token):
                strings[i] = bytes(alphabet[c] for c in token)  # byte-level BPE: one character per byte
            else:
                strings[i] = token.replace("▁", " ").encode("utf-8")
        return strings


Tokenizer = ByteTokenizer | BpeTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    return ByteTokenizer() if spec == "byte" else BpeTokenizer(spec)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> BpeTokenizer:
    """Train a byte-level BPE offline on the given texts and write tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise OptionError(
            "{vocab_size} {n} is too small; byte-level BPE needs at least {least}", n=vocab_size,
            least=256 + len(SPECIAL_TOKENS),
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return BpeTokenizer(out_path)
