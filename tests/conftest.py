"""Every test sees eight emulated CPU devices; shared configs and meshes live here."""

import os
import tempfile

# Tests compile the same small programs many times, in this process and in the CLI
# subprocesses they start: a compilation cache fresh for each session shares them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tessera-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

from infra.mesh import DEFAULT_RULES, build_mesh  # noqa: E402
from train.config import load_config  # noqa: E402

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


def mesh_for(cfg, n_devices: int | None = None):
    devices = jax.devices()[:n_devices] if n_devices else jax.devices()
    return build_mesh(cfg, devices)


@pytest.fixture(scope="session")
def rules():
    return dict(DEFAULT_RULES)


def pytest_configure(config):
    assert jax.device_count() == 8, "tests expect 8 emulated CPU devices (set before jax is imported)"
