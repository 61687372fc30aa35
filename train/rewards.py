"""Reward functions for reinforcement learning, run batched on the host over a step's completions and summed
with their weights. A spec is `[W*]NAME[:ARG]`:

    regex:PATTERN   1 if the completion matches (Python `re.search`; anchor with ^ and $), else 0
    count:TEXT      the share of the completion's bytes covered by occurrences of TEXT (0..1)
    length:N        -(tokens beyond N) / N: a penalty for completions longer than N tokens
    eos             -1 for a completion cut off before its end token, else 0
    answer          1 if the completion (stripped) equals the prompt's `answer`, else 0
    similarity      difflib's ratio of the completion to the prompt's `answer` (0..1): partial credit
    rm:RUN_DIR      a reward model's score (`train.objective=reward`)
    NAME            a callable registered under the `tessera.rewards` entry-point group
    module:function a callable imported from a module on the Python path

A user callable takes (prompts, completions), two lists of strings, and returns one float per completion.
A reward that cannot be found is refused at start-up; one that raises or returns a non-finite number at
run time fails only the groups it failed on (found by calling it group by group), which are then skipped.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from train.config import ConfigError, first_line

ENTRY_POINT_GROUP = "tessera.rewards"
BUILT_IN = ("regex", "count", "length", "eos", "answer", "similarity", "rm")
WEIGHT = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*(.+)$", re.S)


@dataclass(frozen=True)
class Rollouts:
    """What reward functions see of one batch of completions (rows grouped by prompt)."""

    prompts: list[str]
    completions: list[str]
    ended: np.ndarray  # [rows] bool: the completion ended with an end token
    lengths: np.ndarray  # [rows] int: completion tokens (the end token included)
    answers: list[str | None]

    def rows(self, index: Sequence[int]) -> "Rollouts":
        return Rollouts([self.prompts[i] for i in index], [self.completions[i] for i in index], self.ended[index],
                        self.lengths[index], [self.answers[i] for i in index])


@dataclass(frozen=True)
class Reward:
    spec: str  # as written
    kind: str  # a built-in name, or "user"
    label: str  # its name in the metrics: reward_<label>_mean, ...
    weight: float
    fn: Callable[[Rollouts], Sequence[float]]


def _count(text: str) -> Callable[[Rollouts], list[float]]:
    needle = text.encode("utf-8")
    if not needle:
        raise ConfigError("rl.rewards: count:TEXT needs a non-empty TEXT")
    return lambda r: [len(needle) * c.encode("utf-8").count(needle) / max(len(c.encode("utf-8")), 1)
                      for c in r.completions]


def _length(arg: str) -> Callable[[Rollouts], list[float]]:
    if not arg.isdigit() or int(arg) < 1:
        raise ConfigError(f"rl.rewards: length:N needs a positive whole N, got {arg!r}")
    limit = int(arg)
    return lambda r: [-max(0, int(n) - limit) / limit for n in r.lengths]


def _regex(pattern: str) -> Callable[[Rollouts], list[float]]:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"rl.rewards: regex:{pattern} is not a valid regular expression ({e})") from None
    return lambda r: [float(compiled.search(c) is not None) for c in r.completions]


def _answer(r: Rollouts) -> list[float]:
    return [float(a is not None and c.strip() == a.strip()) for c, a in zip(r.completions, r.answers, strict=True)]


def _similarity(r: Rollouts) -> list[float]:
    return [0.0 if a is None else difflib.SequenceMatcher(None, c.strip(), a.strip()).ratio()
            for c, a in zip(r.completions, r.answers, strict=True)]


def _user(fn: Callable) -> Callable[[Rollouts], Sequence[float]]:
    return lambda r: fn(list(r.prompts), list(r.completions))


def _imported(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import runs the module's code: anything may fail
        raise ConfigError(f"rl.rewards: cannot import {module_name!r} for reward {spec!r} ({first_line(e)})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"rl.rewards: {module_name} has no callable {attr!r} (reward {spec!r})")
    return fn


def _entry_point(name: str) -> Callable | None:
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name:
            return point.load()
    return None


def split_weight(spec: str) -> tuple[float, str]:
    """`W*BODY` -> (W, BODY); a spec without a weight weighs 1."""
    m = WEIGHT.match(spec)
    return (1.0, spec) if m is None else (float(m.group(1)), m.group(2).strip())


def reward_model_runs(specs: list[str]) -> list[str]:
    """The run directories of the rm: rewards among `specs`."""
    bodies = [split_weight(s)[1] for s in specs]
    return [body[len("rm:"):] for body in bodies if body.startswith("rm:")]


def parse_reward(spec: str, reward_model: Callable[[str], Callable[[Rollouts], Sequence[float]]]) -> Reward:
    """One reward from its spec; `reward_model(run_dir)` builds an rm: reward."""
    weight, body = split_weight(spec)
    name, _, arg = body.partition(":")
    builders = {"regex": _regex, "count": _count, "length": _length, "rm": reward_model}
    if name in builders:
        if not arg:
            raise ConfigError(f"rl.rewards: {name} needs an argument ({name}:...), got {spec!r}")
        return Reward(spec, name, name, weight, builders[name](arg))
    if name in ("eos", "answer", "similarity") and not arg:
        fn = {"eos": lambda r: [0.0 if e else -1.0 for e in r.ended], "answer": _answer, "similarity": _similarity}
        return Reward(spec, name, name, weight, fn[name])
    if arg:  # module:function
        return Reward(spec, "user", arg, weight, _user(_imported(body)))
    registered = _entry_point(name)
    if registered is None:
        raise ConfigError(f"rl.rewards: unknown reward {spec!r}; use one of {', '.join(BUILT_IN)}, a "
                          f"{ENTRY_POINT_GROUP} entry point, or module:function")
    return Reward(spec, "user", name, weight, _user(registered))


def parse_rewards(specs: list[str], reward_model) -> list[Reward]:
    if not specs:
        raise ConfigError("rl.rewards is empty: give at least one reward (e.g. rl.rewards=[answer]) or "
                          "rl.reward_model=RUN")
    rewards = [parse_reward(s, reward_model) for s in specs]
    seen: dict[str, int] = {}
    for i, r in enumerate(rewards):  # one metric name each
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            rewards[i] = Reward(r.spec, r.kind, f"{r.label}_{seen[r.label]}", r.weight, r.fn)
    return rewards


def _values(reward: Reward, rollouts: Rollouts) -> np.ndarray:
    values = np.asarray(reward.fn(rollouts), np.float64)
    if values.shape != (len(rollouts.completions),):
        raise ValueError(f"returned {values.shape[0] if values.ndim == 1 else values.shape} values for "
                         f"{len(rollouts.completions)} completions")
    return values


def check_rewards(rewards: list[Reward], probe: Rollouts) -> None:
    """Each reward called once on a probe completion before training starts: a reward that cannot run is
    refused now, in one line, rather than at the first step."""
    for r in rewards:
        try:
            values = _values(r, probe)
        except Exception as e:
            raise ConfigError(f"rl.rewards: {r.spec!r} failed on a probe completion: {type(e).__name__}: "
                              f"{first_line(e)}") from None
        if not np.all(np.isfinite(values)):
            raise ConfigError(f"rl.rewards: {r.spec!r} returned {values.tolist()} on a probe completion; a reward "
                              "is a finite number")


@dataclass
class Scored:
    total: np.ndarray  # [rows] float32: the weighted sum (0 on failed rows)
    each: dict[str, np.ndarray]  # label -> [rows] values (NaN on failed rows)
    failed: np.ndarray  # [rows] bool: the row's group failed a reward
    errors: list[str]  # one line per failure, naming the reward and the prompt


def score(rewards: list[Reward], rollouts: Rollouts, group_size: int) -> Scored:
    """Every reward over the batch; a failure is narrowed to the groups it happened in."""
    rows = len(rollouts.completions)
    failed, errors, each = np.zeros(rows, bool), [], {}
    for r in rewards:
        raised: set[int] = set()  # the groups whose call raised (reported with the exception)
        try:
            values = _values(r, rollouts)
        except Exception:
            values = np.full(rows, np.nan)
            for start in range(0, rows, group_size):
                group = list(range(start, start + group_size))
                try:
                    values[group] = _values(r, rollouts.rows(group))
                except Exception as e:
                    raised.add(start)
                    errors.append(f"reward {r.spec!r} raised {type(e).__name__}: {first_line(e)} on prompt "
                                  f"{rollouts.prompts[start]!r}")
        for start in sorted({int(i) // group_size * group_size for i in np.flatnonzero(~np.isfinite(values))}):
            if start not in raised:
                errors.append(f"reward {r.spec!r} returned a non-finite value on prompt {rollouts.prompts[start]!r}")
            failed[start:start + group_size] = True
        each[r.label] = values
    total = sum(r.weight * np.nan_to_num(each[r.label]) for r in rewards)
    return Scored(np.where(failed, 0.0, total).astype(np.float32), each, failed, errors)
