"""Text in, text out: prompts -> tokens -> the compiled decode loop (sampling or beam search) on a
mesh -> completions, with stop strings, structured outputs and best-of-N.

Parameters and the KV cache are sharded by the same logical-axis rules as training:
the batch over the batch axes, heads (and kv heads in the cache) over `tensor`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.beam import beam_search
from model.config import ModelConfig
from model.generate import STOPPED_EOS, STOPPED_STRING, StopStrings, generate
from model.sampling import Sampling
from train.config import ConfigError, OptionError
from train.constraints import regex_automaton, schema_regex
from train.sharding import Rules, activation_rules, batch_shards, batch_sharding, replicated
from train.tokenizer import Tokenizer

PROMPT_BUCKET = 16  # prompt widths round up to this, so nearby prompt lengths share one compile
FINISH_REASONS = {STOPPED_EOS: "eos", STOPPED_STRING: "stop", 3: "length"}

ScoreFn = Callable[[str, str], float]  # (prompt, completion) -> score, higher is better


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    num_samples: int = 1  # completions per prompt (with beam search: the best beams)
    stop: tuple[str, ...] = ()
    beam: int = 0  # > 0: beam search of this width instead of sampling
    length_penalty: float = 0.0  # beam score = log p / length**length_penalty
    best_of: int = 0  # > 0: sample this many per prompt and keep the best
    regex: str | None = None
    json_schema: str | None = None  # the schema's JSON text
    chat: bool = False  # each prompt is a user message, formatted by the tokenizer's chat template

    def check(self) -> None:
        """One clear error for any setting outside its range."""
        problems = [
            (self.max_new_tokens < 1, "{max_new_tokens} must be at least 1, got {value}", self.max_new_tokens),
            (not self.temperature >= 0, "{temperature} must be >= 0 (0 is greedy), got {value}", self.temperature),
            (self.top_k < 0, "{top_k} must be >= 0 (0 turns it off), got {value}", self.top_k),
            (not 0 < self.top_p <= 1, "{top_p} must be in (0, 1] (1 turns it off), got {value}", self.top_p),
            (self.num_samples < 1, "{num_samples} must be at least 1, got {value}", self.num_samples),
            (self.beam < 0 or self.best_of < 0, "{beam} and {best_of} must be positive", None),
            (self.beam and self.best_of, "choose one of {beam} and {best_of}", None),
            (self.beam and self.num_samples > self.beam, "{num_samples} exceeds {beam} ({value})",
             f"{self.num_samples} > {self.beam}"),
            (self.best_of and self.num_samples > 1, "{best_of} returns one completion per prompt; drop {num_samples}",
             None),
            (self.regex is not None and self.json_schema is not None, "choose one of {regex} and {json_schema}", None),
            (self.beam and (self.regex is not None or self.json_schema is not None),
             "structured outputs work with sampling, not {beam}", None),
            (self.beam and self.stop, "{stop} works with sampling, not {beam}", None),
            (self.stop and (self.regex is not None or self.json_schema is not None),
             "{stop} would cut a structured output short of matching; drop {stop} or the constraint", None),
            (any(s == "" for s in self.stop), "{stop} strings must not be empty", None),
        ]
        for bad, template, value in problems:
            if bad:
                raise OptionError(template, value=value)

    @property
    def constraint(self) -> str | None:
        """The regex every output must match, if any."""
        return schema_regex(self.json_schema) if self.json_schema is not None else self.regex


@dataclass
class Completion:
    text: str
    tokens: list[int]
    logprob: float  # total log-probability under the model (temperature 1)
    finish_reason: str  # eos | stop | length
    score: float | None = None  # best-of-N or beam ranking score
    candidates: list[float] = field(default_factory=list)  # best-of-N: every candidate's score

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(len(self.tokens), 1)


def check_request(cfg: ModelConfig, tokenizer: Tokenizer, prompts: list[str], opts: SamplingOptions):
    """Everything that can refuse a request, before any compile -> (token ids per prompt, automaton or None).

    Refuses bad options, empty prompts, prompts that leave no room to generate within the
    model's context, and constraints the tokenizer cannot satisfy in max_new_tokens.
    """
    opts.check()
    if not cfg.causal:
        raise ConfigError("this model is a masked-LM encoder; generation needs a decoder (model.architecture=decoder)")
    if not prompts:
        raise ConfigError("give at least one prompt")
    encoded = []
    template = None
    if opts.chat:
        from train.data.chat import ChatTemplate

        template = ChatTemplate(tokenizer, "the run's tokenizer")
    for i, text in enumerate(prompts):
        ids = template.prompt([{"role": "user", "content": text}]) if template and text else tokenizer.encode(text)
        if len(ids) == 0:
            raise ConfigError(f"prompt {i} is empty; give at least one character to continue from")
        if len(ids) + opts.max_new_tokens > cfg.max_seq_len:
            raise OptionError(
                "prompt {i} is {n} tokens; with {max_new_tokens} {new} that exceeds the model's context of "
                "{context} tokens (shorten the prompt or lower {max_new_tokens})",
                i=i, n=len(ids), new=opts.max_new_tokens, context=cfg.max_seq_len,
            )
        encoded.append(ids)
    constraint = opts.constraint
    automaton = None if constraint is None else regex_automaton(constraint, tokenizer, cfg.vocab_size, opts.max_new_tokens)
    return encoded, automaton


class Generator:
    """A model's parameters on a mesh plus its tokenizer, ready to complete prompts."""

    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, params, tokenizer: Tokenizer, mesh: Mesh, rules: Rules):
        self.cfg, self.graphdef, self.params, self.tokenizer, self.mesh = cfg, graphdef, params, tokenizer, mesh
        self.rules = rules
        self.rows_sharding = batch_sharding(mesh, rules)
        self.row_multiple = batch_shards(mesh, rules)
        self.param_shardings = jax.tree.map(lambda a: a.sharding, params)
        self.rows1 = NamedSharding(mesh, PartitionSpec(self.rows_sharding.spec[0]))
        self._compiled: dict[tuple, Callable] = {}
        self.allowed_tokens = allowed_token_mask(cfg, tokenizer)

    # -------------------------------------------------------------- compiled programs

    def _program(self, kind: str, **static) -> Callable:
        """The jitted sampling or beam program for these compile-time settings (built once)."""
        key = (kind, *sorted(static.items()))
        if key not in self._compiled:
            rows, rows1 = self.rows_sharding, self.rows1
            if kind == "sample":
                fn = functools.partial(self._sample_fn, **static)
                shardings = (self.param_shardings, rows, rows1, rows1, rows1, None, None, rows1, None)
            else:
                fn = functools.partial(self._beam_fn, **static)
                shardings = (self.param_shardings, rows, rows1, rows1, None)
            self._compiled[key] = jax.jit(fn, in_shardings=shardings, out_shardings=replicated(self.mesh))
        return self._compiled[key]

    def _sample_fn(self, params, prompt, prompt_len, keys, sampling, stops, automaton, active, allowed, *,
                   max_new_tokens):
        with activation_rules(self.mesh, self.rules):
            model = nnx.merge(self.graphdef, params)
            return generate(
                model, prompt, prompt_len, jax.random.wrap_key_data(keys), sampling, max_new_tokens=max_new_tokens,
                eos_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id, stops=stops, automaton=automaton,
                active=active, allowed_tokens=allowed,
            )

    def _beam_fn(self, params, prompt, prompt_len, active, allowed, *, width, max_new_tokens, length_penalty):
        with activation_rules(self.mesh, self.rules):
            model = nnx.merge(self.graphdef, params)
            return beam_search(
                model, prompt, prompt_len, width=width, max_new_tokens=max_new_tokens, eos_ids=self.tokenizer.stop_ids,
                pad_id=self.tokenizer.pad_id, length_penalty=length_penalty, active=active, allowed_tokens=allowed,
            )

    # -------------------------------------------------------------- host side

    def _left_padded(self, rows: list[np.ndarray], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Rows right-aligned in one width (bucketed; the batch padded to a multiple of the batch axes)."""
        longest = max(len(r) for r in rows)
        width = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, self.cfg.max_seq_len - max_new_tokens)
        n = -(-len(rows) // self.row_multiple) * self.row_multiple
        prompt = np.full((n, width), self.tokenizer.pad_id, np.int32)
        lengths = np.ones(n, np.int32)
        for i, r in enumerate(rows):
            prompt[i, width - len(r):] = r
            lengths[i] = len(r)
        return prompt, lengths, len(rows)

    @functools.cached_property
    def _token_byte_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Each token's bytes [vocab, T] (-1 padded) and byte counts [vocab]: built once, for stop strings."""
        pieces = self.tokenizer.token_byte_strings[: self.cfg.vocab_size]
        pieces = pieces + [b""] * (self.cfg.vocab_size - len(pieces))
        return padded_bytes(pieces), np.array([len(p) for p in pieces], np.int32)

    def _stop_tables(self, stop: tuple[str, ...]) -> StopStrings | None:
        if not stop:
            return None
        encoded = [s.encode("utf-8") for s in stop]
        return StopStrings(*self._token_byte_table, padded_bytes(encoded), np.array([len(s) for s in encoded], np.int32))

    def _text(self, tokens: list[int], stop: tuple[str, ...]) -> str:
        text = self.tokenizer.decode([t for t in tokens if t not in self.tokenizer.stop_ids])
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
        return text[:cut]

    def complete(self, prompts: list[str], opts: SamplingOptions, score: ScoreFn | None = None) -> list[list[Completion]]:
        """Completions for each prompt: `num_samples` of them (beam: the best beams; best-of: the best one)."""
        encoded, automaton = check_request(self.cfg, self.tokenizer, prompts, opts)
        if opts.beam:
            return self._complete_beam(encoded, opts)
        per_prompt = opts.best_of or opts.num_samples
        rows = [ids for ids in encoded for _ in range(per_prompt)]
        prompt, lengths, n_real = self._left_padded(rows, opts.max_new_tokens)
        keys = row_keys(opts.seed, [ids for ids in encoded for _ in range(per_prompt)], per_prompt, len(prompt))
        n = len(prompt)
        sampling = Sampling(
            np.full(n, opts.temperature, np.float32), np.full(n, opts.top_k, np.int32), np.full(n, opts.top_p, np.float32)
        )
        program = self._program("sample", max_new_tokens=opts.max_new_tokens)
        active = np.arange(n) < n_real  # filler rows (padding the batch to the mesh) start stopped
        out = jax.device_get(program(self.params, prompt, lengths, keys, sampling, self._stop_tables(opts.stop),
                                     automaton, active, self.allowed_tokens))
        completions = [
            Completion(
                self._text(out.tokens[r, : out.lengths[r]].tolist(), opts.stop),
                out.tokens[r, : out.lengths[r]].tolist(),
                float(out.logprobs[r, : out.lengths[r]].sum()),
                FINISH_REASONS[int(out.stop_reason[r])],
            )
            for r in range(n_real)
        ]
        grouped = [completions[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
        if not opts.best_of:
            return grouped
        return [[best_of(group, prompts[i], score)] for i, group in enumerate(grouped)]

    def _complete_beam(self, encoded: list[np.ndarray], opts: SamplingOptions) -> list[list[Completion]]:
        prompt, lengths, n_real = self._left_padded(encoded, opts.max_new_tokens)
        program = self._program(
            "beam", width=opts.beam, max_new_tokens=opts.max_new_tokens, length_penalty=float(opts.length_penalty)
        )
        active = np.arange(len(prompt)) < n_real
        out = jax.device_get(program(self.params, prompt, lengths, active, self.allowed_tokens))
        results = []
        for r in range(n_real):
            beams = []
            for w in range(opts.num_samples):
                tokens = out.tokens[r, w, : out.lengths[r, w]].tolist()
                reason = "eos" if tokens and tokens[-1] in self.tokenizer.stop_ids else "length"
                beams.append(Completion(self._text(tokens, ()), tokens, float(out.logprob[r, w]), reason,
                                        float(out.scores[r, w])))
            results.append(beams)
        return results


def allowed_token_mask(cfg: ModelConfig, tokenizer: Tokenizer) -> np.ndarray:
    """[vocab] bool: the ids a completion may contain: the tokenizer's real tokens and the ids that end a
    generation, never padding, other special tokens or the ids a model vocabulary is rounded up with."""
    allowed = np.zeros(cfg.vocab_size, bool)
    pieces = tokenizer.token_byte_strings[: cfg.vocab_size]
    allowed[: len(pieces)] = [len(p) > 0 for p in pieces]
    allowed[[i for i in tokenizer.stop_ids if i < cfg.vocab_size]] = True
    return allowed


def padded_bytes(strings: list[bytes]) -> np.ndarray:
    """[len(strings), longest] int32 of each string's bytes, -1 padded."""
    out = np.full((len(strings), max(1, max(map(len, strings)))), -1, np.int32)
    for i, piece in enumerate(strings):
        out[i, : len(piece)] = list(piece)
    return out


def row_keys(seed: int, rows: list[np.ndarray], per_prompt: int, n: int) -> np.ndarray:
    """Key data [n, 2] for each row: from the seed, the prompt's tokens and the sample number, so a
    row's randomness never depends on its place in the batch (filler rows reuse the last key)."""
    base = jax.random.key(seed)
    ids = [(zlib.crc32(r.astype(np.int32).tobytes()) & 0x7FFFFFFF, i % per_prompt) for i, r in enumerate(rows)]
    ids += [ids[-1]] * (n - len(ids))
    prompt_hash, sample = (jnp.asarray(a, jnp.int32) for a in zip(*ids, strict=True))
    keys = jax.vmap(lambda h, i: jax.random.fold_in(jax.random.fold_in(base, h), i))(prompt_hash, sample)
    return np.asarray(jax.random.key_data(keys))


def best_of(candidates: list[Completion], prompt: str, score: ScoreFn | None = None) -> Completion:
    """The candidate with the highest score: `score(prompt, text)` if given, else mean log-probability per token."""
    scores = [score(prompt, c.text) if score is not None else c.mean_logprob for c in candidates]
    best = candidates[int(np.argmax(scores))]
    best.score, best.candidates = float(max(scores)), [float(s) for s in scores]
    return best
