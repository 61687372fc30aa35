"""Conversations and preference pairs: what their JSONL lines hold, and how a tokenizer's chat template turns
them into tokens with per-token loss marks.

A chat line is `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` or
`{"prompt": "...", "completion": "..."}`; a preference line is `{"prompt": ..., "chosen": "...", "rejected":
"..."}`, its prompt a string or a list of messages. Every turn is tokenized on its own, so no merge crosses a
prompt/response boundary, and only assistant turns (each ending with the end token) are marked for the loss.

Templates: a Tessera tokenizer (byte, or BPE from `tessera tokenizer train`) writes each turn as
`<|role|>content<eod>` with its role markers as special tokens; a Hugging Face tokenizer renders its own
`chat_template` (jinja2) and adds no tokens, so the vocabulary and an export stay intact.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from train.config import ConfigError
from train.tokenizer import CHAT_ROLE_TOKENS, BpeTokenizer, Tokenizer

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class ChatDataError(ConfigError):
    """A chat or preference line that cannot be used; the message names its file and line."""


def _messages(value: Any, where: str, what: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise ChatDataError(f"{where}: {what} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ChatDataError(f"{where}: {what}[{i}] must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise ChatDataError(f"{where}: {what}[{i}] has role {m.get('role')!r}; a role is one of {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ChatDataError(f"{where}: no string {key!r} field (found keys: {', '.join(record) or 'none'})")
    if not value.strip():
        raise ChatDataError(f"{where}: {key!r} is empty; every response needs text to learn from")
    return value


def parse_chat(record: Any, where: str) -> Messages:
    """A chat line's messages, checked: known roles, at least one assistant turn, no empty response."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: a chat line is a JSON object with 'messages' or 'prompt' and 'completion'")
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": _text(record, "prompt", where)},
                    {"role": "assistant", "content": _text(record, "completion", where)}]
    else:
        raise ChatDataError(f"{where}: a chat line needs 'messages', or 'prompt' and 'completion' (found keys: "
                            f"{', '.join(record) or 'none'})")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: the conversation has no assistant message to learn from")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise ChatDataError(f"{where}: an assistant message is empty; every response needs text to learn from")
    return messages


def parse_preference(record: Any, where: str) -> dict:
    """A preference line checked: {"prompt": messages, "chosen": str, "rejected": str}."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: a preference line is a JSON object with 'prompt', 'chosen' and 'rejected'")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _text(record, "prompt", where)}]
    else:
        prompt = _messages(prompt, where, "prompt")
    return {"prompt": prompt, "chosen": _text(record, "chosen", where), "rejected": _text(record, "rejected", where)}


class ChatTemplate:
    """A tokenizer's chat format: conversations -> (tokens, loss marks), prompts -> tokens that end where the
    assistant's answer begins."""

    def __init__(self, tokenizer: Tokenizer, name: str = "data.tokenizer"):
        self.tokenizer = tokenizer
        self.hf_template = getattr(tokenizer, "chat_template", None)
        if self.hf_template is None:
            if isinstance(tokenizer, BpeTokenizer) and tokenizer.from_hf:
                raise ConfigError(f"{name}: this Hugging Face tokenizer has no chat_template; use an instruct "
                                  "model's tokenizer, or add chat_template.jinja beside its tokenizer.json")
            missing = [t for t in CHAT_ROLE_TOKENS if t not in tokenizer.special]
            if missing:
                raise ConfigError(f"{name} has no {', '.join(missing)} tokens, which chat data needs; use 'byte' or "
                                  "a tokenizer.json made by `tessera tokenizer train` (it adds the role markers)")
            self.role_ids = {role: tokenizer.special[t] for role, t in zip(ROLES, CHAT_ROLE_TOKENS, strict=True)}

    def _piece(self, text: str) -> np.ndarray:
        encode = getattr(self.tokenizer, "encode_fragment", self.tokenizer.encode)
        return np.asarray(encode(text), np.int32)

    def encode(self, messages: Messages) -> tuple[np.ndarray, np.ndarray]:
        """The conversation's tokens and loss marks (1 on each assistant turn's tokens and end token)."""
        pieces: list[tuple[np.ndarray, int]] = []
        if self.hf_template is None:
            eod = np.int32(self.tokenizer.eod_id)
            for m in messages:
                mark = int(m["role"] == "assistant")
                pieces.append((np.array([self.role_ids[m["role"]]], np.int32), 0))
                pieces.append((np.append(self._piece(m["content"]), eod).astype(np.int32), mark))
        else:
            pieces = self._hf_pieces(messages)
        tokens = np.concatenate([p for p, _ in pieces])
        marks = np.concatenate([np.full(len(p), mark, np.uint8) for p, mark in pieces])
        return tokens, marks

    def prompt(self, messages: Messages) -> np.ndarray:
        """A prompt's tokens, ending with the assistant's marker: what generation continues."""
        if self.hf_template is not None:
            return self._piece(self._render(messages, True))
        tokens, _ = self.encode(messages)
        return np.append(tokens, np.int32(self.role_ids["assistant"])).astype(np.int32)

    def _render(self, messages: Messages, generation_prompt: bool) -> str:
        return _compiled(self.hf_template).render(messages=messages, add_generation_prompt=generation_prompt,
                                                  **self.tokenizer.named_tokens)

    def _hf_pieces(self, messages: Messages) -> list[tuple[np.ndarray, int]]:
        """Each turn rendered as the template renders the conversation up to it, the difference tokenized alone;
        an assistant turn split into its header (no loss) and its content, ended by a stop token."""
        pieces, before = [], ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self._render(messages[:i], True) if i else ""
                pieces.append((self._piece(_after(head, before)), 0))
                before = head
            full = self._render(messages[: i + 1], False)
            piece = self._piece(_after(full, before))
            if m["role"] == "assistant" and (not len(piece) or piece[-1] not in self.tokenizer.stop_ids):
                piece = np.append(piece, np.int32(self.tokenizer.eod_id)).astype(np.int32)
            pieces.append((piece, int(m["role"] == "assistant")))
            before = full
        return pieces


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ConfigError("this chat_template renders a conversation differently from its beginning; it cannot "
                          "be split into turns")
    return text[len(prefix):]


@functools.lru_cache(maxsize=4)
def _compiled(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
