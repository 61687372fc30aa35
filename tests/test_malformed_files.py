"""Every file the CLI reads, fed malformed bytes, wrong types, wrong encodings or truncation: its reader either
accepts it or raises ConfigError (which the CLI prints as one line naming the file, exit code 2), never any
other exception (which would be a traceback). Property-based: hypothesis generates the damage."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import tiny_config
from train.config import ConfigError
from train.recipes import load_config

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Scalars and containers of any type: what a YAML or JSON file can hold where another type belongs.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def damaged(valid: bytes):
    """Bytes like a valid file's, damaged: truncated, a byte changed, re-encoded, or arbitrary."""
    return st.one_of(
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, max(len(valid) - 1, 0)), st.integers(0, 255)).map(
            lambda c: valid[:c[0]] + bytes([c[1]]) + valid[c[0] + 1:]),
        st.sampled_from(["utf-16", "utf-32", "latin-1"]).map(lambda enc: valid.decode("utf-8").encode(enc, "replace")),
        st.binary(max_size=200),
    )


def accepted_or_refused(read, *args):
    """read(*args) either returns or raises ConfigError; anything else fails the test."""
    try:
        return read(*args)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), repr(e)  # one line
        return None


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


VALID_RECIPE = Path("configs/experiments/tiny.yaml").read_bytes()


@SETTINGS
@given(data=damaged(VALID_RECIPE))
def test_a_damaged_recipe_is_read_or_refused(tmp_path, data):
    accepted_or_refused(load_config, write(tmp_path, "recipe.yaml", data))


@SETTINGS
@given(path=st.lists(st.sampled_from(["model", "data", "train", "mesh", "precision", "moe", "rules", "preset",
                                      "n_layers", "seq_len", "steps", "data", "qat", "distill"]), min_size=1,
                     max_size=3),
       value=values)
def test_a_recipe_with_a_wrong_type_anywhere_is_refused(tmp_path, path, value):
    tree = yaml.safe_load(VALID_RECIPE)
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict) or key not in node else node[key]
        if not isinstance(node, dict):
            break
    else:
        node[path[-1]] = value
    accepted_or_refused(load_config, write(tmp_path, "recipe.yaml", yaml.safe_dump(tree).encode()))


@SETTINGS
@given(data=damaged(Path("configs/models/llama3-8b.yaml").read_bytes()))
def test_a_damaged_model_preset_is_read_or_refused(tmp_path, data):
    preset = write(tmp_path, "preset.yaml", data)
    accepted_or_refused(load_config, None, [f"model={preset}", "data.seq_len=64"])
    accepted_or_refused(load_config, preset)


@SETTINGS
@given(data=damaged(yaml.safe_dump(tiny_config().model_dump(mode="json")).encode()))
def test_a_damaged_run_config_is_read_or_refused(tmp_path, data):
    from train.run_dir import check_run_dir

    write(tmp_path, "config.yaml", data)
    accepted_or_refused(load_config, tmp_path)
    accepted_or_refused(check_run_dir, tiny_config(tmp_path=tmp_path))


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> bytes:
    from train.data.sources import stdlib_documents
    from train.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe([t for _, t in stdlib_documents(10)], 300, path)
    return path.read_bytes()


@SETTINGS
@given(cut=st.floats(0, 1), flip=st.integers(0, 10**6), kind=st.sampled_from(["truncate", "flip", "json"]),
       value=values)
def test_a_damaged_tokenizer_is_read_or_refused(tmp_path, tokenizer_json, cut, flip, kind, value):
    from train.tokenizer import load_tokenizer

    if kind == "truncate":
        data = tokenizer_json[: int(cut * len(tokenizer_json))]
    elif kind == "flip":
        i = flip % len(tokenizer_json)
        data = tokenizer_json[:i] + bytes([tokenizer_json[i] ^ 0x55]) + tokenizer_json[i + 1:]
    else:  # valid JSON with a section replaced by a value of another type
        tree = json.loads(tokenizer_json)
        tree[sorted(tree)[flip % len(tree)]] = value
        data = json.dumps(tree).encode()
    tokenizer = accepted_or_refused(load_tokenizer, str(write(tmp_path, "tokenizer.json", data)))
    if tokenizer is not None:  # what training reads of it works too
        assert len(tokenizer.token_bytes) == tokenizer.vocab_size and tokenizer.decode(tokenizer.encode("x = 1"))


@SETTINGS
@given(data=st.binary(max_size=300) | damaged(b'{"text": "def f():\\n    return 1"}\n{"text": "x = 2"}\n'),
       field=st.sampled_from(["text", "body"]))
def test_damaged_data_files_are_skipped_record_by_record(tmp_path, data, field):
    from train.data.prepare import prepare
    from train.data.sources import FileSource, read_documents

    path = write(tmp_path, "data.jsonl", data)
    docs = [*read_documents(FileSource("jsonl", (str(path),), field))[0],
            *read_documents(FileSource("text", (str(path),)))[0]]
    assert all(isinstance(text, str) and text.strip() for _, text in docs)
    out = tmp_path / f"prepared-{uuid.uuid4().hex}"
    accepted_or_refused(prepare, FileSource("jsonl", (str(path),), field), "byte", out)


@SETTINGS
@given(schema=values | st.just({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3}}}),
       raw=st.none() | st.binary(max_size=60))
def test_a_damaged_json_schema_is_read_or_refused(tmp_path, schema, raw):
    from infra.commands.sample import read_schema
    from train.constraints import schema_regex

    path = write(tmp_path, "schema.json", raw if raw is not None else json.dumps(schema).encode())
    text = accepted_or_refused(read_schema, str(path))
    if text is not None:
        accepted_or_refused(schema_regex, text)


@SETTINGS
@given(meta=values, key=st.sampled_from(["temperature", "batches", "batch_size", "k", "seq_len", "vocab_size"]),
       raw=st.none() | st.binary(max_size=40))
def test_damaged_teacher_top_k_files_are_refused(tmp_path, meta, key, raw):
    from train.teacher import dump_meta, open_topk
    from train.tokenizer import ByteTokenizer

    cfg = tiny_config("distill.teacher=runs/teacher", f"distill.teacher_topk={tmp_path}", "train.steps=2")
    good = dump_meta(cfg, ByteTokenizer(), 4, 2)
    data = raw if raw is not None else json.dumps({**good, key: meta}).encode()
    write(tmp_path, "meta.json", data)
    source = accepted_or_refused(open_topk, cfg, ByteTokenizer(), 0, 1)
    if source is not None:
        write(tmp_path, "shard-00000.npz", b"PK\x03\x04 not a zip")  # a shard cut short
        with pytest.raises(ConfigError, match="shard-00000.npz"):
            next(source)


def test_a_torn_or_undecodable_metrics_file_keeps_its_whole_lines(tmp_path):
    from train.metrics import MetricsWriter

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"step": 4, "lo\xff\xfe')
    MetricsWriter(tmp_path, keep_through_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:2]


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_from_a_fresh_process(tmp_path):
    """End to end, in a process of its own: no stray traceback from abandoned checkpoint reads either."""
    from tests.conftest import TINY_DATA, TINY_MODEL

    run = [*TINY_MODEL, *TINY_DATA, "mesh.data=-1", "train.steps=2", "train.eval_batches=1", "checkpoint.every=2",
           f"run.dir={tmp_path}"]
    assert subprocess.run([sys.executable, "-m", "infra.cli", "train", *run], capture_output=True).returncode == 0
    for p in (tmp_path / "checkpoints").rglob("*"):
        if p.is_file() and p.stat().st_size:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    for argv in (["train", *run, "train.steps=4"], ["sample", str(tmp_path), "--prompt", "x"]):
        proc = subprocess.run([sys.executable, "-m", "infra.cli", *argv], capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("tessera: error: none of the checkpoints") and "can be read" in lines[0]
    # Nothing readable at all points at a config that no longer matches, not at damage: nothing is set aside.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


@SETTINGS
@given(model=values, precision=values, legacy=st.sampled_from(["param_dtype", "dtype", "grad_dtype", "n_layers"]))
def test_a_run_config_from_before_the_precision_section_with_wrong_types_is_refused(tmp_path, model, precision, legacy):
    tree = tiny_config().model_dump(mode="json")
    tree["model"][legacy], tree["precision"] = model, precision
    write(tmp_path, "config.yaml", yaml.safe_dump(tree).encode())
    accepted_or_refused(load_config, tmp_path)
