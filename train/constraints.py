"""Structured outputs: a regular expression or a JSON schema compiled, for one tokenizer, into
the dense token-level automaton that the decode loop walks (`model.generate.Automaton`).

outlines-core builds the automaton: it turns the regex into a byte-level DFA and maps
every token's bytes through it, so byte-level and BPE tokenizers (whose tokens may
split a UTF-8 character) are handled alike. A JSON schema becomes a regex first
(outlines-core's `build_regex_from_schema`).
"""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import outlines_core

from model.generate import Automaton
from train.config import OptionError, first_line
from train.tokenizer import Tokenizer

UNREACHABLE = np.iinfo(np.int32).max // 2
# JSON-schema keywords outlines-core's regex builder drops silently; outputs could then fail validation.
IGNORED_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
STATE_BUCKET = 64  # state tables are padded to a multiple of this, so most constraints share one compile


def schema_regex(schema: str | dict) -> str:
    """The regex of every JSON document valid under `schema` (compact or single-spaced)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        ignored = _ignored_keywords(json.loads(text))
        if ignored:
            raise OptionError(
                "{json_schema} uses {keyword!r}, which structured decoding cannot enforce (numeric bounds are not "
                "regular); bound integers with minDigits/maxDigits or an enum instead", keyword=ignored,
            )
        return outlines_core.json_schema.build_regex_from_schema(text)
    except OptionError:
        raise
    except (ValueError, TypeError) as e:
        raise OptionError("{json_schema} is not a JSON schema outlines-core supports: {reason}",
                          reason=first_line(e)) from None


def _ignored_keywords(node) -> str | None:
    if isinstance(node, dict):
        found = next((k for k in IGNORED_KEYWORDS if k in node and not isinstance(node[k], dict)), None)
        return found or next((f for v in node.values() if (f := _ignored_keywords(v))), None)
    if isinstance(node, list):
        return next((f for v in node if (f := _ignored_keywords(v))), None)
    return None


def _vocabulary(tokenizer: Tokenizer) -> outlines_core.Vocabulary:
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, piece in enumerate(tokenizer.token_byte_strings):
        if piece and token_id != tokenizer.eod_id:
            by_bytes.setdefault(piece, []).append(token_id)
    return outlines_core.Vocabulary(tokenizer.eod_id, by_bytes)


def regex_automaton(regex: str, tokenizer: Tokenizer, vocab_size: int, max_new_tokens: int) -> Automaton:
    """The automaton whose accepted token sequences spell exactly the strings that fully match `regex`.

    Raises OptionError for an invalid regex, one that no token sequence of this tokenizer
    can match, or one whose shortest match needs more than max_new_tokens tokens.
    """
    try:
        index = outlines_core.Index(regex, _vocabulary(tokenizer))
    except (ValueError, RuntimeError) as e:
        reason = first_line(e)
        raise OptionError(
            "{regex} {value!r} cannot constrain decoding with this tokenizer: {reason}", value=regex, reason=reason
        ) from None
    transitions = index.get_transitions()
    states = sorted(set(transitions) | {s for edges in transitions.values() for s in edges.values()})
    number = {s: i for i, s in enumerate(states)}
    n_padded = -(-len(states) // STATE_BUCKET) * STATE_BUCKET
    next_state = np.full((n_padded, vocab_size), -1, np.int32)
    for s, edges in transitions.items():
        for token, target in edges.items():
            if token < vocab_size:
                next_state[number[s], token] = number[target]
    accepting = np.zeros(n_padded, bool)
    for s in index.get_final_states():
        accepting[number[s]] = True
    eos = tokenizer.eod_id
    next_state[:, eos] = np.where(accepting, np.arange(n_padded), -1)  # eos ends the output, only when complete
    steps = _steps_to_accept(next_state, accepting, eos)
    initial = number[index.get_initial_state()]
    if steps[initial] >= UNREACHABLE:
        raise OptionError("{regex} {value!r}: no sequence of this tokenizer's tokens matches it", value=regex)
    if steps[initial] > max_new_tokens:
        raise OptionError(
            "{regex} {value!r} needs at least {steps} tokens; raise {max_new_tokens} (now {now})",
            value=regex, steps=int(steps[initial]), now=max_new_tokens,
        )
    return Automaton(next_state, steps, accepting, np.int32(initial))


def _steps_to_accept(next_state: np.ndarray, accepting: np.ndarray, eos: int) -> np.ndarray:
    """Fewest tokens from each state to an accepting one (breadth-first search backwards)."""
    n = len(accepting)
    predecessors: list[set[int]] = [set() for _ in range(n)]
    sources, tokens = np.nonzero(next_state >= 0)
    for s, t in zip(sources, tokens, strict=True):
        if t != eos:
            predecessors[next_state[s, t]].add(int(s))
    steps = np.full(n, UNREACHABLE, np.int32)
    queue = deque(np.flatnonzero(accepting).tolist())
    steps[accepting] = 0
    while queue:
        s = queue.popleft()
        for p in predecessors[s]:
            if steps[p] == UNREACHABLE:
                steps[p] = steps[s] + 1
                queue.append(p)
    return steps
