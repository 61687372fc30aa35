"""Tokenizers: byte-level (built in, nothing to download) and BPE through HF `tokenizers`.

Both expose the same small surface: encode/decode, the special-token ids the data
pipeline needs, the ids that end a generation, each token's UTF-8 bytes (for constrained
decoding and stop strings), and bytes and characters per token (for bits per byte and
per character).

A tokenizer.json with a sibling tokenizer_config.json is a Hugging Face tokenizer (as
`tessera import-hf` copies it): it behaves as HF's does by default, special tokens (BOS,
[CLS] ... [SEP]) added to every encoding and its own names for the special roles. One
without (from `tessera tokenizer train`) adds nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from train.config import ConfigError, OptionError, first_line

# The chat roles' markers come last (train/data/chat.py): a native tokenizer formats conversations with them.
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = ("<pad>", "<eod>", "<mask>", "<cls>", "<sep>", *CHAT_ROLE_TOKENS)
# Names other tokenizers use for the end-of-document token, tried in order.
EOD_ALIASES = ("<eod>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
# Tessera's special roles and the tokenizer_config.json entries that name them in an HF tokenizer.
HF_ROLES = {
    "<eod>": "eos_token", "<pad>": "pad_token", "<mask>": "mask_token", "<cls>": "cls_token", "<sep>": "sep_token",
}
HF_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "cls_token", "sep_token")


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
        self.stop_ids = (self.eod_id,)
        self.bos_id = None
        self.chat_template = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    encode_fragment = encode  # nothing is ever added around a byte encoding

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @cached_property
    def token_byte_strings(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b""] * len(SPECIAL_TOKENS)


def byte_level_alphabet() -> dict[str, int]:
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


def _read_json(path: Path) -> dict | None:
    """An HF config file beside tokenizer.json, or None if there is none."""
    if not path.is_file():
        return None
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({first_line(e, 160)})") from None
    if not isinstance(tree, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return tree


def _content(entry) -> str | None:
    """A special token as tokenizer_config.json names it: a string, or an AddedToken dict with "content"."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _types(node) -> set[str]:
    """The component types in a tokenizer.json section, those nested in a Sequence included."""
    if isinstance(node, list):
        return set().union(*map(_types, node))
    if not isinstance(node, dict):
        return set()
    own = {node["type"]} if isinstance(node.get("type"), str) else set()
    return own.union(*map(_types, node.values()))


def _chat_template(path: Path, config: dict) -> str | None:
    """The chat template HF would use: chat_template.jinja beside the tokenizer if there is one, else
    tokenizer_config.json's (its "default" one where it names several)."""
    jinja = path.with_name("chat_template.jinja")
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


class BpeTokenizer(_PerTokenCounts):
    """A `tokenizer.json` loaded with HF `tokenizers`: Tessera's own, or an HF model's when a
    tokenizer_config.json lies beside it."""

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
        # A tokenizer.json may ship with truncation or padding on; documents are never cut or padded here.
        self._tok.no_truncation()
        self._tok.no_padding()
        # Ids need not be contiguous (a hand-edited or damaged file): the tables span the largest id.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        config = _read_json(path.with_name("tokenizer_config.json"))
        self.from_hf = config is not None
        config = config or {}
        # Older HF folders name some special tokens only in special_tokens_map.json.
        names = {**(_read_json(path.with_name("special_tokens_map.json")) or {}), **config} if self.from_hf else {}
        ids = {key: self._tok.token_to_id(c) for key in HF_NAMED if (c := _content(names.get(key)))}
        self._named = {key: i for key, i in ids.items() if i is not None}  # HF's special tokens, by config key
        # BERT names no eos_token: its encodings end with [SEP], which then ends a document.
        eod = self._named.get("eos_token", self._named.get("sep_token"))
        if eod is None:
            eod = next((self._tok.token_to_id(t) for t in EOD_ALIASES if self._tok.token_to_id(t) is not None), None)
        if eod is None:
            raise TokenizerError(f"{path} has no end-of-document token; add one of {', '.join(EOD_ALIASES)}")
        self.eod_id = eod
        self.bos_id = self._named.get("bos_token")  # None: nothing marks a beginning
        if self.from_hf:
            self.special = {role: self._named[key] for role, key in HF_ROLES.items() if key in self._named}
            self.special["<eod>"] = eod
        else:
            self.special = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is not None}
        self.pad_id = self.special.get("<pad>", eod)  # padding only fills the corpus tail, with zero loss weight
        # generation_config.json may name more ids that end a turn (Llama 3 instruct: <|eom_id|>, <|eot_id|>).
        stops = [eod]
        if self.from_hf:
            extra = (_read_json(path.with_name("generation_config.json")) or {}).get("eos_token_id")
            extra = extra if isinstance(extra, list) else [extra]
            stops += [i for i in extra if type(i) is int and 0 <= i < self.vocab_size]
        self.stop_ids = tuple(dict.fromkeys(stops))
        self.chat_template = _chat_template(path, config) if self.from_hf else None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=self.from_hf).ids, dtype=np.int32)

    @property
    def named_tokens(self) -> dict[str, str]:
        """HF's special tokens by their tokenizer_config.json key (bos_token, eos_token, ...): what a chat template
        is rendered with."""
        return {key: self._tok.id_to_token(i) for key, i in self._named.items()}

    def encode_fragment(self, text: str) -> np.ndarray:
        """A piece of a longer text (a chat turn): no special tokens added around it."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=self.from_hf)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    @cached_property
    def token_byte_strings(self) -> list[bytes]:
        """The UTF-8 bytes each token stands for (empty for special tokens), by the vocabulary's kind."""
        spec = json.loads(self._tok.to_str())
        model = spec.get("model") or {}
        byte_level = "ByteLevel" in _types(spec.get("pre_tokenizer")) | _types(spec.get("decoder"))
        byte_fallback = bool(model.get("byte_fallback"))  # SentencePiece-style: <0x0A> is the byte 0x0A
        word_piece = model.get("continuing_subword_prefix") if model.get("type") == "WordPiece" else None
        alphabet = byte_level_alphabet()
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        special_ids = set(self._named.values())
        strings = [b""] * self.vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if token in specials or i in special_ids:
                continue
            if byte_level and all(c in alphabet for c in token):
                strings[i] = bytes(alphabet[c] for c in token)  # byte-level BPE: one character per byte
            elif byte_fallback and re.fullmatch("<0x[0-9A-Fa-f]{2}>", token):
                strings[i] = bytes([int(token[3:5], 16)])
            elif word_piece:
                # "##ing" continues a word; any other piece starts one, and decoding puts a space before it.
                # An approximation: the text's first word and punctuation get no space when decoded.
                cont = token.startswith(word_piece)
                strings[i] = token[len(word_piece):].encode("utf-8") if cont else b" " + token.encode("utf-8")
            else:
                strings[i] = token.replace("▁", " ").encode("utf-8")  # SentencePiece marks a space with ▁
        return strings


Tokenizer = ByteTokenizer | BpeTokenizer


HF_SIBLINGS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte', or a tokenizer.json (local or gs://, read from a local copy with the HF files beside it)."""
    if spec == "byte":
        return ByteTokenizer()
    from train import storage

    return BpeTokenizer(storage.local_copy(spec, HF_SIBLINGS))


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
