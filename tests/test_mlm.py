"""The masked-language-model encoder and objective: bidirectional attention, BERT's masking
recipe measured over many draws, a loss over the selected positions only, and both tiny
presets (MoE decoder, MLM encoder; two layers: one dense, one MoE) learning on the built-in corpus."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer
from tests.conftest import mesh_for, tiny_config
from train.recipes import load_config
from train.objectives import make_objective
from train.objectives.masked import MaskedTokens
from train.tokenizer import ByteTokenizer, train_bpe

ENCODER = ModelConfig(architecture="encoder", n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=264,
                      max_seq_len=32, norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True)


def byte_objective() -> MaskedTokens:
    return make_objective(load_config(None, ["model=tiny-mlm"]), ByteTokenizer())


@pytest.mark.parametrize("architecture", ["encoder", "decoder"])
def test_encoder_sees_later_tokens_and_decoder_does_not(architecture):
    cfg = ENCODER.model_copy(update={"architecture": architecture})
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.state(Transformer(cfg, nnx.Rngs(0))))()
    apply = jax.jit(lambda t: nnx.merge(graphdef, params)(t))
    tokens = jnp.arange(16, dtype=jnp.int32)[None] % 200
    changed = tokens.at[0, 12].set(201)
    moved = np.abs(np.asarray(apply(changed) - apply(tokens)))[0, :12].max(axis=-1)
    if architecture == "encoder":
        assert np.all(moved > 1e-6)  # every earlier position reacts to the later change
    else:
        assert np.all(moved == 0)


def test_encoder_rows_start_with_cls_and_never_select_special_tokens():
    objective, tok = byte_objective(), ByteTokenizer()
    inputs = np.array([[65, 66, tok.eod_id, 67, 68, tok.pad_id]], np.int32)
    rows = objective.rows({"inputs": inputs, "targets": inputs, "segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
                           "positions": np.zeros_like(inputs), "weights": np.ones((1, 6), np.float32)})
    assert rows["inputs"][0, 0] == tok.special["<cls>"]
    np.testing.assert_array_equal(rows["targets"], rows["inputs"])
    np.testing.assert_array_equal(rows["weights"][0], [0, 1, 0, 1, 1, 0])  # <cls>, <eod>, padding never


def test_masking_follows_15_percent_then_80_10_10():
    objective = byte_objective()
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (64, 512)).astype(np.int32)
    inputs[:, ::7] = ByteTokenizer().eod_id  # special tokens sprinkled in: never selected
    selectable = (inputs < 256).astype(np.float32)
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(inputs), "weights": jnp.asarray(selectable)}
    counts = np.zeros(4)
    for seed in range(4):
        out = jax.device_get(objective.prepare(batch, jax.random.key(seed)))
        selected = out["weights"] > 0
        assert not np.any(selected & (selectable == 0))
        assert np.all(out["inputs"][~selected] == inputs[~selected])  # unselected tokens are untouched
        new = out["inputs"][selected]
        assert np.all((new < 256) | (new == objective.mask_id))  # replacements are ordinary tokens
        counts += [selected.sum(), (new == objective.mask_id).sum(),
                   ((new != objective.mask_id) & (new != inputs[selected])).sum(), (new == inputs[selected]).sum()]
    n_selectable = 4 * selectable.sum()
    assert counts[0] / n_selectable == pytest.approx(0.15, abs=0.003)  # ~75k selections: sd 0.0006
    mask, random, kept = counts[1:] / counts[0]
    assert mask == pytest.approx(0.8, abs=0.008)
    assert random == pytest.approx(0.1 * 255 / 256, abs=0.006)  # a random draw may hit the original token
    assert kept == pytest.approx(0.1 + 0.1 / 256, abs=0.006)


def test_loss_covers_only_the_selected_positions(rules):
    from train.program import build_program

    cfg = tiny_config("model=tiny-mlm", "model.d_model=32", "model.d_ff=64", "model.max_seq_len=32")
    program = build_program(cfg, mesh_for(cfg, 1), rules)
    objective, params = program.objective, program.init_state()["params"]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (8, 32)).astype(np.int32)
    batch = objective.rows({"inputs": raw, "targets": raw, "segment_ids": np.ones_like(raw),
                            "positions": np.broadcast_to(np.arange(32), raw.shape).astype(np.int32),
                            "weights": np.ones(raw.shape, np.float32)})
    from train.evaluate import EVAL_SEED, Scorer

    scorer = Scorer(program.model.graphdef, program.shardings["params"], ByteTokenizer(), program.mesh, rules, 8,
                    objective)
    before = scorer.batches(params, [program.device_batch(batch)])
    selected = np.asarray(objective.prepare(batch, jax.random.key(EVAL_SEED))["weights"]) > 0
    scrambled = dict(batch, targets=np.where(selected, batch["targets"], (batch["targets"] + 1) % 256))
    after = scorer.batches(params, [program.device_batch(scrambled)])
    assert 0 < before.tokens == selected.sum() < raw.size
    assert after.nll == before.nll


def test_bpe_tokenizer_carries_the_mlm_special_tokens(tmp_path):
    from train.data.sources import stdlib_documents

    bpe = train_bpe([t for _, t in stdlib_documents(20)], 400, tmp_path / "tokenizer.json")
    objective = make_objective(load_config(None, ["model=tiny-mlm", f"data.tokenizer={bpe.path}"]), bpe)
    assert objective.mask_id == bpe.special["<mask>"] and objective.cls_id == bpe.special["<cls>"]
    assert set(objective.special_ids) >= {bpe.eod_id, bpe.special["<sep>"], bpe.special["<pad>"]}
    assert objective.mask_id not in objective.ordinary_ids


# ---------------------------------------------------------------- both tiny presets learn

SHORT = ["data.seq_len=64", "data.batch_size=8", "data.max_documents=120", "train.steps=30", "train.log_every=5",
         "train.eval_every=30", "train.eval_batches=2", "optimizer.warmup_steps=5", "checkpoint.every=30", "mesh.data=1",
         "model.n_layers=2", "model.d_model=64", "model.max_seq_len=64"]


@pytest.mark.parametrize("experiment", ["tiny-moe", "tiny-mlm"])
@pytest.mark.slow
def test_tiny_presets_lower_their_loss(tmp_path, rules, experiment):
    from train.loop import train

    cfg = load_config(f"configs/experiments/{experiment}.yaml", [*SHORT, f"run.dir={tmp_path}"])
    result = train(cfg, mesh_for(cfg, 1), rules)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logged if "loss" in m]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    assert result["eval_accuracy"] > 0.1
    if experiment == "tiny-moe":
        last = [m for m in logged if "moe_aux_loss" in m][-1]
        assert last["moe_aux_loss"] >= 1.0 and len(last["moe_expert_load"]) == 8
        assert sum(last["moe_expert_load"]) == pytest.approx(1.0)
