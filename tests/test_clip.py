"""The dual encoder (model/clip.py): its published parameter count, the patch embedding against a convolution,
pooling at the end token, FLOP counts against XLA's, the data's counted skips, config errors, and one training
step on 8-device meshes equal to the one-device step on the same global batch."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from PIL import Image

from infra.mesh import logical_rules
from model.clip import ClipModel, patchify
from model.clip_flops import clip_param_counts, clip_train_flops_per_pair
from model.config import ModelConfig
from model.flops import optimizer_flops_per_param
from tests.conftest import mesh_for
from train.config import ConfigError
from train.data.image_text import ImageTextPairs, PairRows
from train.program import build_program
from train.recipes import load_config
from train.tokenizer import load_tokenizer

B16 = "configs/models/clip-vit-b16.yaml"
RECIPE = "configs/experiments/tiny-clip.yaml"
TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.vocab_size=264",
        "model.max_seq_len=16", "model.clip.embed_dim=16", "model.clip.vision.image_size=8",
        "model.clip.vision.patch_size=4", "model.clip.vision.n_layers=2", "model.clip.vision.d_model=32",
        "model.clip.vision.n_heads=4", "model.clip.vision.d_ff=64", "model.clip.vision.pooling=class", "data.seq_len=16",
        "data.batch_size=8"]


def params_of(cfg: ModelConfig) -> dict:
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ClipModel(cfg, nnx.Rngs(0))), nnx.Param))


def test_clip_vit_b16_has_the_published_149_620_737_parameters():
    preset = yaml.safe_load(open(B16))
    assert preset.pop("precision") == "bf16"  # the policy it is planned with; not a model key
    cfg = ModelConfig(**preset)
    params = params_of(cfg)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(params) == 149_620_737
    # OpenAI's split: the visual tower with its projection, the text tower with its projection, the scale.
    assert count(params["vision"]) + count(params["image_proj"]) == 86_192_640
    assert count(params["text"]) + count(params["text_proj"]) == 63_428_096
    analytic = clip_param_counts(cfg)
    assert analytic["total"] == 149_620_737
    assert analytic["vision"] == count(params["vision"]) and analytic["text"] == count(params["text"])


def test_patch_embedding_equals_a_convolution_with_stride_equal_to_the_patch():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 12, 12, 3)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(4 * 4 * 3, 5)), jnp.float32)
    ours = jnp.einsum("bnp,pd->bnd", patchify(images, 4), weight)
    kernel = weight.reshape(4, 4, 3, 5)  # (row, column, channel) -> HWIO
    conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(ours, conv.reshape(2, 9, 5), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config(RECIPE, TINY).model
    return cfg, ClipModel(cfg, nnx.Rngs(0))


def test_text_embedding_is_read_at_the_end_token_and_ignores_what_follows(tiny_model):
    _, model = tiny_model
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 200, size=(2, 16)), jnp.int32)
    lengths = jnp.asarray([5, 9])
    base = model.encode_texts(tokens, lengths)
    padded = tokens.at[0, 5:].set(7).at[1, 9:].set(0)
    np.testing.assert_allclose(model.encode_texts(padded, lengths), base, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(base, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(model.encode_texts(tokens, jnp.asarray([4, 9]))[0], base[0])  # the end token matters


def test_quick_gelu_is_x_sigmoid_1702x():
    from model.layers import mlp_activation

    x = jnp.linspace(-4, 4, 9)
    np.testing.assert_allclose(mlp_activation(x, None, "quick_gelu"), x / (1 + np.exp(-1.702 * np.asarray(x))),
                               rtol=1e-6)


def test_train_flops_match_xla_for_both_towers():
    """The analytic count with dense attention equals what XLA counts for the whole step (layers unrolled)."""
    wide = ["model.d_model=128", "model.d_ff=512", "model.clip.vision.d_model=128", "model.clip.vision.d_ff=512",
            "model.clip.embed_dim=64", "data.seq_len=32", "model.max_seq_len=32", "model.clip.vision.image_size=16"]
    cfg = load_config(RECIPE, [*TINY, *wide, "model.scan_layers=false", "model.attention=dense", "mesh.data=1"])
    program = build_program(cfg, mesh_for(cfg, 1), logical_rules(cfg))
    compiled = program.train_step.lower(program.abstract_state(), program.abstract_batch()).compile()
    xla = compiled.cost_analysis()["flops"]
    b = cfg.data.batch_size
    analytic = (clip_train_flops_per_pair(cfg.model, cfg.data.seq_len, b, "dense") * b
                + optimizer_flops_per_param() * program.parameter_count())
    assert analytic == pytest.approx(xla, rel=0.05), (analytic, xla)  # measured -2.4%: norms, softmax, GELU


def write_pairs(root, records: list[dict]) -> str:
    (root / "img").mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    return str(path)


def test_bad_records_are_skipped_and_counted(tmp_path):
    path = write_pairs(tmp_path, [
        {"image": "img/0.png", "text": "a dark square", "split": "train"},
        {"image": "img/1.png", "text": "a grey square", "split": "heldout", "label": "grey"},
        {"image": "img/missing.png", "text": "gone"},
        {"image": "img/broken.png", "text": "broken"},
        {"image": "img/2.png"},
        {"text": "no image"},
    ])
    pairs = ImageTextPairs.read([path], "text", "image", 0.5)
    assert [p.text for p in pairs.train] == ["a dark square"] and [p.label for p in pairs.heldout] == ["grey"]
    assert pairs.skipped == {"missing_image": 1, "unreadable_image": 1, "missing_caption": 1,
                             "missing_image_field": 1, "bad_json": 1}
    rows = PairRows(pairs.train, load_tokenizer("byte"), 16, 4, 3, seed=0).rows(np.arange(3))
    assert rows["images"].shape == (3, 4, 4, 3) and rows["images"].dtype == np.uint8
    tokenizer = load_tokenizer("byte")
    assert rows["lengths"][0] == len("a dark square") + 1 and rows["tokens"][0, rows["lengths"][0] - 1] == tokenizer.eod_id


@pytest.mark.parametrize("overrides, message", [
    (["model.clip.vision.image_size=10"], "model.clip.vision.image_size=10 is not a multiple of model.clip.vision.patch_size=4"),
    (["train.microbatches=2"], "train.microbatches=2: the contrastive loss compares every pair"),
    (["data.source=stdlib"], "a dual encoder trains on image-text pairs: set data.source=images"),
    (["train.objective=next_token"], "model.clip is a dual encoder, trained with train.objective=contrastive"),
    (["mesh.tensor=8", "mesh.data=1", "model.n_heads=8", "model.clip.vision.n_heads=4"],
     "model.clip.vision.n_heads=4 must be divisible by mesh.tensor=8"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(RECIPE, [*TINY, *overrides])


def random_batch(cfg, seed=0) -> dict[str, np.ndarray]:
    rng, b, v = np.random.default_rng(seed), cfg.data.batch_size, cfg.model.clip.vision
    lengths = rng.integers(3, cfg.data.seq_len + 1, size=b).astype(np.int32)
    tokens = rng.integers(1, 250, size=(b, cfg.data.seq_len)).astype(np.int32)
    return {"images": rng.integers(0, 256, size=(b, v.image_size, v.image_size, v.channels)).astype(np.uint8),
            "tokens": tokens, "lengths": lengths, "stop": np.zeros((b, 1), np.int32)}


def one_step(cfg, devices: int):
    program = build_program(cfg, mesh_for(cfg, devices), logical_rules(cfg))
    state = program.init_state()
    state, metrics = program.train_step(state, program.device_batch(random_batch(cfg)))
    return jax.device_get(state["params"]), jax.device_get(metrics)


_ONE_DEVICE: dict[str, tuple] = {}


def one_device_step(loss: str):
    if loss not in _ONE_DEVICE:
        _ONE_DEVICE[loss] = one_step(load_config(RECIPE, [*TINY, "mesh.data=1", f"model.clip.loss={loss}"]), 1)
    return _ONE_DEVICE[loss]


@pytest.mark.parametrize("mesh, loss", [(["mesh.data=2", "mesh.fsdp=4"], "softmax"),
                                        (["mesh.data=2", "mesh.tensor=4"], "softmax"),
                                        pytest.param(["mesh.data=4", "mesh.fsdp=2"], "sigmoid",
                                                     marks=pytest.mark.slow)])
def test_a_step_on_8_devices_equals_the_one_device_step(mesh, loss):
    cfg = load_config(RECIPE, [*TINY, *mesh, f"model.clip.loss={loss}"])
    params, metrics = one_step(cfg, 8)
    want_params, want = one_device_step(loss)
    assert metrics["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Negatives span the global batch: the loss is not the mean of the losses of two halves' local rows.
    from train.objectives.contrastive import Contrastive

    model = ClipModel(cfg.model, nnx.Rngs(params=cfg.run.seed))
    batch = random_batch(cfg)
    image, text = model(batch["images"], batch["tokens"], batch["lengths"])
    bias = None if model.logit_bias is None else model.logit_bias.get_value()
    objective = Contrastive(loss)
    whole = float(objective.loss(image, text, model.log_scale.get_value(), bias)[0])
    assert whole == pytest.approx(want["loss"], rel=1e-5)
    halves = [float(objective.loss(image[s], text[s], model.log_scale.get_value(), bias)[0])
              for s in (slice(0, 4), slice(4, 8))]
    assert np.mean(halves) != pytest.approx(want["loss"], rel=1e-5)  # (the tolerance the equalities above hold to)


def test_classes_files_hold_templates_or_one_template(tmp_path):
    from train.data.image_text import read_classes

    (tmp_path / "a.json").write_text(json.dumps({"templates": ["a {}", "two {}s"], "classes": ["cat", "dog"]}))
    (tmp_path / "b.json").write_text(json.dumps({"template": "a photo of a {}", "classes": ["cat", "dog"]}))
    (tmp_path / "c.json").write_text(json.dumps({"classes": ["cat"]}))
    assert read_classes(str(tmp_path / "a.json")) == (["cat", "dog"], [["a cat", "two cats"], ["a dog", "two dogs"]])
    assert read_classes(str(tmp_path / "b.json"))[1] == [["a photo of a cat"], ["a photo of a dog"]]
    with pytest.raises(ConfigError, match="needs two distinct classes"):
        read_classes(str(tmp_path / "c.json"))
    with pytest.raises(ConfigError, match="nope.json is not a classes file"):
        read_classes(str(tmp_path / "nope.json"))
