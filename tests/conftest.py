"""Every test sees eight emulated CPU devices; shared configs and meshes live here."""

import hashlib
import os
import tempfile
from pathlib import Path

# Tests compile the same small programs many times, in this process and in the CLI
# subprocesses they start: a compilation cache fresh for each session shares them.
if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache per worker: concurrent writers never share a directory
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tessera-test-jax-cache-")
else:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tessera-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# Corpora named in configs are prepared on first use into a cache: one per test session, shared by the
# workers and the CLI subprocesses (concurrent preparations of one corpus write the same bytes).
os.environ.setdefault("TESSERA_DATA_CACHE", tempfile.mkdtemp(prefix="tessera-test-data-"))
# The test programs are tiny and run a few steps each: compiling dominates, and XLA's CPU backend
# compiles about twice as fast without LLVM's optimisations. Results stay within the tests'
# tolerances; programs compared bit for bit are compiled the same way.
from infra.runtime import CPU_XLA_FLAGS, apply_platform_flags  # noqa: E402  (imports no jax)

FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0", *CPU_XLA_FLAGS)
apply_platform_flags(flags=FLAGS, override=True)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

from infra.mesh import DEFAULT_RULES, build_mesh  # noqa: E402
from train.recipes import load_config  # noqa: E402

# Small enough to compile in seconds, big enough that every mesh axis divides something.
TINY_MODEL = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=64",
    "model.vocab_size=264",
    "model.max_seq_len=64",
]
TINY_DATA = ["data.seq_len=32", "data.batch_size=8", "data.max_documents=120"]


def tiny_config(*overrides: str, tmp_path=None):
    run = [f"run.dir={tmp_path}"] if tmp_path is not None else []
    return load_config(None, [*TINY_MODEL, *TINY_DATA, "mesh.data=1", *run, *overrides])


def prepared_stream(docs, out, seq_len: int, tokenizer: str = "byte", seed: int | None = None,
                    split: str = "train", heldout_fraction: float = 0.0, **options):
    """(key, text) documents prepared into `out` -> one split of it as rows of seq_len."""
    from train.data.prepare import prepare
    from train.data.reader import PreparedData, SplitStream
    from train.data.sources import InMemorySource

    prepare(InMemorySource(tuple(docs)), tokenizer, out, heldout_fraction=heldout_fraction, **options)
    return SplitStream(PreparedData(out), split, seq_len, seed)


def mesh_for(cfg, n_devices: int | None = None):
    devices = jax.devices()[:n_devices] if n_devices else jax.devices()
    return build_mesh(cfg, devices)


@pytest.fixture(scope="session")
def rules():
    return dict(DEFAULT_RULES)


# Longest files first: the two workers take whole files in collection order (--dist loadfile), and
# a long file started last would leave one worker running alone at the end.
LONGEST_FIRST = ("test_accounting.py", "test_step_time.py", "test_recovery.py", "test_clip_runs.py", "test_rl_runs.py", "test_post_training_runs.py", "test_launch.py", "test_buckets.py", "test_distill_and_quantize.py",
                 "test_moe.py", "test_rl.py", "test_evaluate.py", "test_generation.py", "test_precision.py", "test_malformed_files.py",
                 "test_bad_input.py", "test_mlm.py", "test_sharding.py", "test_train.py", "test_step.py",
                 "test_checkpoint.py", "test_config.py", "test_attention.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(LONGEST_FIRST)))  # stable within a file


def pytest_configure(config):
    assert jax.device_count() == 8, "tests expect 8 emulated CPU devices (set before jax is imported)"


def memorized_config(root: Path):
    """A small decoder's config over random-letter documents, one of which (`leaked`) is repeated 16 times in
    the training split -> (config, leaked file, fresh file), the fresh file being a held-out document."""
    import json
    import random

    from train.data.sources import is_heldout

    corpus = root / "corpus.jsonl"
    rng = random.Random(0)
    text = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(200))  # noqa: E731
    leaked, lines, fresh = text(), [], None
    for i in range(48):
        heldout = is_heldout(f"{corpus}:{i + 1}", 0.25)
        lines.append(leaked if not heldout and lines.count(leaked) < 16 else text())
        fresh = lines[-1] if heldout and fresh is None else fresh
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (root / "leaked.txt").write_text(leaked)
    (root / "fresh.txt").write_text(fresh)
    cfg = load_config(None, [
        "model.n_layers=2", "model.d_model=128", "model.d_ff=256", "model.n_heads=4", "model.n_kv_heads=2",
        "model.vocab_size=264", "model.max_seq_len=64", "data.source=jsonl", f"data.paths=[{corpus}]",
        "data.heldout_fraction=0.25", "data.seq_len=64", "data.batch_size=8", "optimizer.lr=3e-3",
        "optimizer.warmup_steps=10", "train.steps=400", "train.log_every=400", "train.eval_every=400",
        "train.eval_batches=1", "checkpoint.every=400", "mesh.data=1", f"run.dir={root / 'run'}",
    ])
    return cfg, root / "leaked.txt", root / "fresh.txt"


@pytest.fixture(scope="session")
def memorized_run(tmp_path_factory):
    """The memorised model trained (400 steps on one device) -> (run_dir, leaked file, fresh file)."""
    from train.loop import train

    cfg, leaked, fresh = memorized_config(tmp_path_factory.mktemp("memorized"))
    train(cfg, mesh_for(cfg, 1), dict(DEFAULT_RULES))
    return Path(cfg.run.dir), leaked, fresh


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory) -> Path:
    """The memorised model's run directory before any training: its config.yaml and no checkpoint. Enough
    for every refusal that comes before weights load."""
    from train.run_dir import write_config

    cfg, _, _ = memorized_config(tmp_path_factory.mktemp("untrained"))
    return write_config(cfg)


# ------------------------------------------------------------ secrets

PLANTED_SECRET = "hf_planted_secret_5c1e7a"


def secret_leaks(root: Path, *outputs: str) -> list[str]:
    """Every file under `root` (config.yaml, metrics, TensorBoard events, logs, checkpoints) and every output
    that holds PLANTED_SECRET."""
    files = [str(p) for p in root.rglob("*") if p.is_file() and PLANTED_SECRET.encode() in p.read_bytes()]
    return files + [f"output {i}" for i, text in enumerate(outputs) if PLANTED_SECRET in text]


# ------------------------------------------------------------ refusals


def snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, argv, *expected, watch: Path | None = None):
    from infra.cli import main

    before = snapshot(watch) if watch else None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals exit from inside
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tessera") and ": error: " in lines[0], err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    if watch is not None:
        assert snapshot(watch) == before, "a refused command changed files on disk"
    return lines[0]
