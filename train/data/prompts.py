"""Prompts for reinforcement learning: a JSONL file (`{"prompt": "..." | [messages], "answer": "..."}`, the
answer optional) or the shipped generators (`synth:upper,sort`), tokenized once at start-up (a prompt set is
small) and split into training and held-out prompts. A bad line is refused naming its file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from train import storage
from train.config import ConfigError
from train.data import synth
from train.data.chat import ChatDataError, ChatTemplate, Messages, _messages
from train.tokenizer import Tokenizer

SYNTH_PREFIX = "synth:"
SYNTH_COUNT = 4096  # prompts drawn from the generators: more than any CPU run samples


@dataclass(frozen=True)
class Prompt:
    messages: Messages
    answer: str | None
    tokens: np.ndarray  # what generation continues (the chat template's prompt, or the text's tokens)

    @property
    def text(self) -> str:
        """The prompt as a reward function sees it: the last user message."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def _records(source: str, seed: int) -> list[tuple[Messages, str | None]]:
    if source.startswith(SYNTH_PREFIX):
        tasks = tuple(t.strip() for t in source[len(SYNTH_PREFIX):].split(",") if t.strip())
        return [([{"role": "user", "content": p}], answer) for p, answer, _ in synth.examples(SYNTH_COUNT, seed, tasks)]
    path = storage.path(source)
    if not path.is_file():
        raise ConfigError(f"rl.prompts={source}: no such file; give a JSONL file of prompts or synth:TASKS "
                          f"(tasks: {', '.join(synth.TASKS)})")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise ChatDataError(f"{where}: a prompt line is a JSON object with 'prompt' (a string or messages)")
        prompt = record["prompt"]
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) and prompt.strip()
                    else _messages(prompt, where, "prompt"))
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ChatDataError(f"{where}: 'answer' must be a string")
        out.append((messages, answer))
    if not out:
        raise ConfigError(f"rl.prompts={source} holds no prompts")
    return out


def load_prompts(source: str, tokenizer: Tokenizer, *, chat: bool, width: int, heldout: int,
                 seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts); every prompt's tokens must fit in `width` (a rollout row's prompt
    part)."""
    template = ChatTemplate(tokenizer, "data.tokenizer") if chat else None
    prompts = []
    for i, (messages, answer) in enumerate(_records(source, seed)):
        if template is not None:
            tokens = template.prompt(messages)
        else:
            tokens = np.asarray(tokenizer.encode("\n".join(m["content"] for m in messages)), np.int32)
        if len(tokens) > width:
            raise ConfigError(f"rl.prompts: prompt {i} is {len(tokens)} tokens, but a rollout row leaves {width} for "
                              "the prompt (data.seq_len - rl.max_new_tokens); raise data.seq_len or shorten it")
        if len(tokens) == 0:
            raise ConfigError(f"rl.prompts: prompt {i} is empty")
        prompts.append(Prompt(messages, answer, tokens))
    if len(prompts) <= heldout:
        raise ConfigError(f"rl.prompts holds {len(prompts)} prompts; rl.heldout_prompts={heldout} leaves none to train "
                          "on")
    return prompts[heldout:], prompts[:heldout]


def step_prompts(prompts: list[Prompt], step: int, batch: int, seed: int) -> list[Prompt]:
    """The prompts of RL step `step` (0-based): consecutive batches of a seeded order, reshuffled each pass."""
    orders: dict[int, np.ndarray] = {}
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, index = divmod(position, len(prompts))
        if epoch not in orders:
            orders[epoch] = np.random.default_rng((seed, epoch)).permutation(len(prompts))
        out.append(prompts[int(orders[epoch][index])])
    return out
