"""A tiny CLIP end to end on the shipped data: zero-shot classification of held-out synthetic compositions and of
held-out handwritten digits, recall rising from chance, bit-exact resume after SIGKILL, and bad input refused
with one line (exit 2) or skipped and counted."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.test_accounting import HAS_LIBTPU
from tests.test_recovery import finish, losses, wait_for_step
from train.data import image_synth

pytestmark = pytest.mark.slow

RECIPE = "configs/experiments/tiny-clip.yaml"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    image_synth.shapes(out, count=4000, seed=0, size=32)
    return out


@pytest.fixture(scope="module")
def few_shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("few_shapes")
    image_synth.shapes(out, count=300, seed=0, size=32)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    image_synth.digits(out, heldout=400, seed=0, size=8)
    return out


def final_eval(run_dir) -> dict:
    """The last evaluation a run logged (metrics.jsonl)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [m for m in lines if "eval_loss" in m][-1]


def chance_recall_at_1(captions: list[str]) -> float:
    """recall@1 of a random ranking: a query's chance to draw a pair with its own caption."""
    counts = {c: captions.count(c) for c in set(captions)}
    return sum(counts[c] for c in captions) / len(captions) ** 2


def with_bad_records(shapes, out):
    """A copy of the shapes data with three bad records: a missing image, an unreadable one, a missing caption."""
    shutil.copytree(shapes, out)
    lines = (out / "captions.jsonl").read_text().splitlines()
    (out / "images" / "00000.png").unlink()
    (out / "images" / "00001.png").write_bytes(b"not an image")
    record = json.loads(lines[2])
    del record["text"]
    lines[2] = json.dumps(record)
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out


def test_zero_shot_on_held_out_compositions_with_bad_records_counted(shapes, tmp_path):
    """The README's run: a tiny CLIP on the synthetic shapes, then zero-shot classification of images whose
    compositions (shape, colour, size, position, count) it never saw, and retrieval on them. Three bad
    records in the data are skipped and counted, not fatal."""
    data = with_bad_records(shapes, tmp_path / "data")
    rc, out, err = finish(cli("train", RECIPE, f"data.paths=[{data / 'captions.jsonl'}]",
                              f"data.classes={data / 'classes.json'}", f"run.dir={tmp_path / 'run'}"), timeout=600)
    assert rc == 0, err[-2000:]
    assert "skipped data records: missing_caption 1, missing_image 1, unreadable_image 1" in out
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["data_skipped_missing_image"] == 1 and lines[0]["data_train_pairs"] > 3000
    result = final_eval(tmp_path / "run")
    assert 1 / result["eval_zero_shot_classes"] <= 0.1
    assert result["eval_zero_shot_images"] >= 300 and result["eval_zero_shot_accuracy"] >= 0.9, result
    records = [json.loads(x) for x in (shapes / "captions.jsonl").read_text().splitlines()[3:]]
    heldout = [r["text"] for r in records if r["split"] == "heldout"][: result["eval_retrieval_pairs"]]
    chance = chance_recall_at_1(heldout)
    for direction in ("image_to_text", "text_to_image"):
        assert result[f"eval_{direction}_recall_at_1"] > 10 * chance, (direction, chance, result)
    assert "zero-shot accuracy" in out and "recall@1" in out


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p)."""
    return sum(math.comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(successes, trials + 1))


def test_zero_shot_on_held_out_digits(digits, tmp_path):
    rc, out, err = finish(cli(
        "train", RECIPE, f"data.paths=[{digits / 'captions.jsonl'}]", f"data.classes={digits / 'classes.json'}",
        f"run.dir={tmp_path}", "model.clip.vision.image_size=8", "model.clip.vision.patch_size=2",
        "model.clip.vision.channels=1", "data.seq_len=32", "train.steps=150", "train.eval_every=150",
        "train.eval_batches=7", "checkpoint.every=150"), timeout=600)
    assert rc == 0, err[-2000:]
    result = final_eval(tmp_path)
    n, accuracy = result["eval_zero_shot_images"], result["eval_zero_shot_accuracy"]
    assert n >= 300
    p_value = binomial_tail(round(accuracy * n), n, 0.1)
    assert accuracy > 0.1 and p_value < 0.01, (accuracy, n, p_value)
    print(f"digits zero-shot accuracy {accuracy:.3f} over {n} held-out images (binomial p {p_value:.2e})")


def cli(*args, devices=1):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "infra.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_sigkill_then_resume_is_bit_exact_and_eval_and_embed_read_the_run(few_shapes, tmp_path):
    args = [f"data.paths=[{few_shapes / 'captions.jsonl'}]", f"data.classes={few_shapes / 'classes.json'}", "mesh.data=-1",
            "train.steps=20", "train.log_every=1", "checkpoint.every=5", "train.eval_every=1000",
            "train.eval_batches=1", "data.batch_size=16"]
    assert finish(cli("train", RECIPE, f"run.dir={tmp_path / 'ref'}", *args))[0] == 0
    victim = cli("train", RECIPE, f"run.dir={tmp_path / 'run'}", *args)
    wait_for_step(victim, tmp_path / "run", 10)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rc, out, err = finish(cli("train", RECIPE, f"run.dir={tmp_path / 'run'}", *args))
    assert rc == 0, err[-2000:]
    resumed_at = int(re.search(r"resumed from .* at step (\d+)", out).group(1))
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert 1 <= resumed_at < 20 and sorted(got) == list(range(1, 21))
    assert all(got[s] == ref[s] for s in range(resumed_at + 1, 21)), "loss after resume differs"
    assert "zero-shot accuracy" in out and "recall@1" in out

    rc, out, err = finish(cli("eval", str(tmp_path / "run"), "--zero-shot", str(few_shapes / "classes.json"), "--json"))
    assert rc == 0, err[-2000:]
    scored = json.loads(out)
    assert scored["step"] == 20 and scored["zero_shot_classes"] == 12 and 0 <= scored["zero_shot_accuracy"] <= 1
    image = sorted((few_shapes / "images").iterdir())[0]
    rc, out, err = finish(cli("embed", str(tmp_path / "run"), "--text", "a red circle", "--text", "a blue square",
                              "--image", str(image), "--json"))
    assert rc == 0, err[-2000:]
    embedded = json.loads(out)
    embeddings = np.array([e["embedding"] for e in embedded["texts"] + embedded["images"]])
    assert embeddings.shape == (3, 64) and embedded["images"][0]["image"] == str(image)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1])


def test_data_with_no_usable_pairs_is_one_line_and_exit_2(shapes, tmp_path):
    """Per-record problems are counted (the compositions run); data with no usable pair is refused."""
    rc, out, err = finish(cli("train", RECIPE, f"data.paths=[{shapes / 'captions.jsonl'}]", "data.text_field=caption",
                              f"run.dir={tmp_path / 'bad'}"))
    lines = [x for x in err.splitlines() if x.startswith("tessera:")]
    message = "gave 0 training and 0 held-out image-text pairs (skipped: missing_caption 4000)"
    assert rc == 2 and len(lines) == 1 and message in lines[0], err[-1500:]
    assert "Traceback" not in err and not (tmp_path / "bad").exists()


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_plan_of_both_towers_against_the_compiler():
    """`tessera plan` for a dual encoder on a TPU slice: FLOPs within 3% of XLA's count, memory within 10%."""
    small = ["model.n_layers=2", "model.clip.vision.n_layers=2", "model.clip.vision.image_size=112",
             "model.vocab_size=8192", "data.batch_size=128"]
    rc, out, err = finish(cli("plan", "configs/models/clip-vit-b16.yaml", *small, "--target", "v5e-8", "--json"))
    assert rc == 0, err[-2000:]
    plan = json.loads(out)[0]
    assert plan["parameters"]["total"] == plan["parameters"]["text"] + plan["parameters"]["vision"] + \
        plan["parameters"]["projections"] + plan["parameters"]["scalars"]
    assert abs(plan["flops_error"]) < 0.03, plan["flops_error"]
    assert plan["xla_memory"] is not None and abs(plan["memory_error"]) < 0.10, plan["analytic_memory"]
    assert plan["predicted"]["total_s"] > plan["step_time_lower_bound_s"] > 0
