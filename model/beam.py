"""Beam search over the KV-cache decoder, in one `lax.while_loop`.

Each prompt keeps `width` hypotheses. At every step each live hypothesis proposes
every token and a finished one (it emitted one of the eos ids) proposes only itself,
unchanged; the `width` best proposals by length-normalised score survive, and the cache
rows follow their hypotheses. The score is sum(log p) / length**length_penalty, so 0 ranks by
total log-probability and larger values favour longer outputs. Width 1 is greedy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.generate import is_eos, prefill


class Beams(NamedTuple):
    tokens: jax.Array  # [batch, width, max_new] int32, best hypothesis first; pad after its end
    logprob: jax.Array  # [batch, width] float32: total log-probability of each hypothesis
    lengths: jax.Array  # [batch, width] int32: tokens, eos included
    scores: jax.Array  # [batch, width] float32: the ranking score


def _score(logprob, lengths, length_penalty):
    return logprob / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty


def beam_search(
    model,
    prompt: jax.Array,
    prompt_len: jax.Array,
    *,
    width: int,
    max_new_tokens: int,
    eos_ids,
    pad_id: int,
    length_penalty: float = 0.0,
    active: jax.Array | None = None,
    allowed_tokens: jax.Array | None = None,
) -> Beams:
    """eos_ids: the ids that finish a hypothesis (a tuple of ints or a 1-D int array). active [batch] bool:
    filler rows start finished. allowed_tokens [vocab] bool: ids a hypothesis may take."""
    batch, p_width = prompt.shape
    logits, cache, start = prefill(model, prompt, prompt_len, p_width + max_new_tokens)
    rows = jnp.repeat(jnp.arange(batch), width)  # hypothesis (b, w) lives in cache row b * width + w
    cache, logits = model.reorder_cache(cache, rows), logits[rows]
    start, prompt_len = start[rows], prompt_len[rows]
    vocab = logits.shape[-1]
    # Only hypothesis 0 is live at first, so the first step picks `width` distinct tokens.
    logprob = jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf), (batch, 1))
    pad_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)

    def cond(carry):
        i, *_, finished = carry
        return (i < max_new_tokens) & ~jnp.all(finished)

    def body(carry):
        i, cache, logits, tokens, logprob, lengths, finished = carry
        step = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, width, vocab)
        if allowed_tokens is not None:
            step = jnp.where(allowed_tokens, step, -jnp.inf)
        step = jnp.where(finished[..., None], pad_only, step)
        total = logprob[..., None] + step  # [b, w, vocab]
        new_len = lengths[..., None] + (~finished[..., None]).astype(jnp.int32)
        _, best = jax.lax.top_k(_score(total, new_len, length_penalty).reshape(batch, width * vocab), width)
        origin, token = best // vocab, (best % vocab).astype(jnp.int32)
        take = lambda a: jnp.take_along_axis(a, origin, axis=1)  # noqa: E731
        was_finished = take(finished)
        tokens = jnp.take_along_axis(tokens, origin[..., None], axis=1).at[:, :, i].set(token)
        logprob = jnp.take_along_axis(total.reshape(batch, -1), best, axis=1)
        lengths = take(lengths) + (~was_finished).astype(jnp.int32)
        finished = was_finished | is_eos(token, eos_ids)
        cache_rows = (jnp.arange(batch)[:, None] * width + origin).reshape(-1)
        cache = model.reorder_cache(cache, cache_rows)
        positions = (prompt_len + i)[:, None].astype(jnp.int32)
        logits, cache = model.decode(token.reshape(-1, 1), positions, cache, p_width + i, start)
        return i + 1, cache, logits[:, -1], tokens, logprob, lengths, finished

    carry = (
        jnp.int32(0),
        cache,
        logits,
        jnp.full((batch, width, max_new_tokens), pad_id, jnp.int32),
        logprob,
        jnp.zeros((batch, width), jnp.int32),
        jnp.zeros((batch, width), bool) if active is None else jnp.broadcast_to(~active[:, None], (batch, width)),
    )
    _, _, _, tokens, logprob, lengths, _ = jax.lax.while_loop(cond, body, carry)
    scores = _score(logprob, lengths, length_penalty)
    order = jnp.argsort(-scores, axis=1)
    pick = lambda a: jnp.take_along_axis(a, order, axis=1)  # noqa: E731
    return Beams(jnp.take_along_axis(tokens, order[..., None], axis=1), pick(logprob), pick(lengths), pick(scores))
