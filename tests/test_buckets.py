"""gs:// for everything a run reads and writes, against a GCS API server on loopback (tests/gcs_emulator.py):
prepared data, the tokenizer, and the run directory (config, metrics, TensorBoard, orbax checkpoints)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from train.storage import files_under
from train.storage import path as storage_path

BUCKET = "tessera-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment (for this process and the CLI's)."""
    from infra.launch.local import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("gcs") / "server.log"  # a file: a pipe nobody reads would fill and block it
    script = Path(__file__).with_name("gcs_emulator.py")
    server = subprocess.Popen([sys.executable, str(script), str(port), BUCKET], stdout=log.open("w"),
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "serving" not in log.read_text():
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath), google-cloud-storage
           "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore (orbax)
           "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's reader
           "TESSERA_STAGING": str(tmp_path_factory.mktemp("staging"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {**os.environ}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.kill()


def tessera(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "infra.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def done(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def losses(run: str) -> dict[int, float]:
    lines = storage_path(run + "/metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def finished_checkpoints(run: str) -> list[int]:
    """Steps whose orbax commit marker is in the bucket, asked of the server itself (this process's gcsfs
    caches listings, and another process writes the checkpoints)."""
    import urllib.parse
    import urllib.request

    prefix = run.removeprefix(f"gs://{BUCKET}/") + "/checkpoints/"
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o?{query}") as answer:
        names = [item["name"] for item in json.load(answer).get("items", [])]
    parts = [n[len(prefix):].split("/") for n in names]
    return sorted(int(p[0]) for p in parts if p[0].isdigit() and p[1:] == ["commit_success.txt"])


@pytest.mark.slow
def test_prepare_train_kill_and_resume_bit_exact_all_on_gs(gcs, tmp_path):
    from train.data.sources import stdlib_documents
    from train.tokenizer import train_bpe

    tokenizer = f"gs://{BUCKET}/tokenizers/bpe/tokenizer.json"
    train_bpe([t for _, t in stdlib_documents(20)], 300, tmp_path / "tokenizer.json")
    storage_path(tokenizer).parent.mkdir(parents=True, exist_ok=True)
    storage_path(tokenizer).write_bytes((tmp_path / "tokenizer.json").read_bytes())
    data = f"gs://{BUCKET}/data/code"
    out = done(tessera(["data", "prepare", "stdlib", "--max-documents", "80", "--tokenizer", tokenizer, "--out", data,
                        "--heldout-fraction", "0.1"], gcs))
    assert "train" in out and storage_path(data + "/manifest.json").is_file()
    assert json.loads(done(tessera(["data", "inspect", data, "--json"], gcs)))["tokenizer"]["vocab_size"] == 300

    run = [*TINY_MODEL, "model.vocab_size=320", "data.seq_len=32", "data.batch_size=8", f"data.source={data}",
           f"data.tokenizer={tokenizer}", "mesh.data=-1", "train.steps=64", "checkpoint.every=8", "train.log_every=1",
           "train.eval_every=1000", "train.eval_batches=1", "optimizer.warmup_steps=2"]
    ref, victim = f"gs://{BUCKET}/runs/ref", f"gs://{BUCKET}/runs/victim"
    done(tessera(["train", *run, f"run.dir={ref}"], gcs))
    reference = losses(ref)
    assert sorted(reference) == list(range(1, 65)) and finished_checkpoints(ref)[-1] == 64

    proc = tessera(["train", *run, f"run.dir={victim}"], gcs)
    deadline = time.monotonic() + 240
    while max(finished_checkpoints(victim), default=0) < 16:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = done(tessera(["train", *run, f"run.dir={victim}"], gcs))
    assert f"resumed from {victim}/checkpoints at step" in out
    got = losses(victim)
    assert sorted(got) == list(range(1, 65))
    assert got == reference  # every step, before and after the kill, as the uninterrupted run
    assert storage_path(victim + "/config.yaml").is_file()
    assert any(p.name.startswith("events") for p in storage_path(victim + "/tensorboard").iterdir())

    scored = json.loads(done(tessera(["eval", victim, "--json", "--max-tokens", "512"], gcs)))
    assert scored["step"] == 64 and scored["bits_per_byte"] > 0


@pytest.mark.slow
def test_a_damaged_checkpoint_in_a_bucket_is_set_aside(gcs, rules):
    from tests.conftest import mesh_for, tiny_config
    from train.checkpoint import Checkpointer
    from train.loop import train
    from train.program import build_program

    run = f"gs://{BUCKET}/runs/damaged"
    cfg = tiny_config("train.steps=4", "checkpoint.every=2", "train.eval_every=1000", "train.eval_batches=1",
                      f"run.dir={run}")
    train(cfg, mesh_for(cfg, 1), rules)
    assert finished_checkpoints(run) == [2, 4]
    state = storage_path(run + "/checkpoints/4/state")
    for file in [f for f in files_under(state) if "ocdbt" in str(f)][:3]:
        file.unlink()
    notes = []
    program = build_program(cfg, mesh_for(cfg, 1), rules)
    checkpointer = Checkpointer(run + "/checkpoints", cfg.checkpoint)
    step, _, _ = checkpointer.restore_latest(program.abstract_state(), notes.append)
    checkpointer.close()
    assert step == 2 and any("step 4 is unreadable" in n for n in notes)
    names = [p.name for p in storage_path(run + "/checkpoints").iterdir()]
    assert "4" not in names and any(n.startswith("4.unreadable-") for n in names)
    assert finished_checkpoints(run) == [2]
