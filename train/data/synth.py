"""Seeded generators of post-training data, standard library only, so a first run and the tests need no
download: chats for supervised finetuning and preference pairs with a checkable rule, written as JSONL.

Tasks (each answer follows from its prompt by a rule a test can check):
- sort: "Sort the letters: dbca" -> "abcd"; the rejected answer is the same letters, not sorted.
- upper: "Shout: hello" -> "HELLO"; the rejected answer keeps the case (same length).
- add: "Add 23 and 45" -> "68"; the rejected answer is off by a few (same digit count where it can be).
- docstring: a function's signature from the built-in corpus -> the first line of its own docstring; the
  rejected answer is another function's.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import string
from collections.abc import Iterator
from pathlib import Path

from train.config import OptionError

TASKS = ("sort", "upper", "add", "docstring")


def _word(rng: random.Random, low: int = 3, high: int = 7) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _sort(rng: random.Random) -> tuple[str, str, str]:
    letters = _word(rng, 4, 8)
    while len(set(letters)) < 2:
        letters = _word(rng, 4, 8)
    chosen = "".join(sorted(letters))
    rejected = chosen
    while rejected == chosen:
        rejected = "".join(rng.sample(chosen, len(chosen)))
    return f"Sort the letters: {letters}", chosen, rejected


def _upper(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return f"Shout: {word}", word.upper(), word


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    return f"Add {a} and {b}", str(a + b), str(wrong)


@functools.cache
def documented_functions(limit: int = 500) -> list[tuple[str, str]]:
    """(signature, first docstring line) of top-level functions of the built-in corpus, in path order."""
    from train.data.sources import FileSource

    found: list[tuple[str, str]] = []
    for path in FileSource("stdlib").files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and (doc := (ast.get_docstring(node) or "").strip()):
                line, signature = doc.splitlines()[0].strip(), f"def {node.name}({ast.unparse(node.args)}):"
                if 10 <= len(line) <= 60 and len(signature) <= 60:  # a whole example fits a short context
                    found.append((signature, line))
        if len(found) >= limit:
            break
    return found[:limit]


def _docstring(rng: random.Random) -> tuple[str, str, str]:
    (signature, doc), (_, other) = rng.sample(documented_functions(), 2)
    return f"Write the docstring's first line for:\n{signature}", doc, other


def _check_tasks(tasks: tuple[str, ...]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise OptionError("{tasks}: unknown task {bad}; choose from {known}", bad=", ".join(unknown) or "(none)",
                          known=", ".join(TASKS))


def examples(n: int, seed: int, tasks: tuple[str, ...] = TASKS) -> Iterator[tuple[str, str, str]]:
    """n (prompt, chosen, rejected) triples, the tasks taken in turn, reproducible from the seed."""
    _check_tasks(tasks)
    makers = {"sort": _sort, "upper": _upper, "add": _add, "docstring": _docstring}
    rng = random.Random(seed)
    for i in range(n):
        yield makers[tasks[i % len(tasks)]](rng)


def chats(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """Chat lines for supervised finetuning: a system message on some, then the prompt and its answer."""
    out = []
    for i, (prompt, answer, _) in enumerate(examples(n, seed, tasks)):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer briefly."})
        out.append({"messages": messages})
    return out


def preferences(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in examples(n, seed, tasks)]


def write_jsonl(lines: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return out
