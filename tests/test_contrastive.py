"""Contrastive image-text losses (InfoNCE, sigmoid) against hand computations and finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.objectives.contrastive import info_nce_loss, sigmoid_loss

# Three pairs whose similarity matrix is written out: image i . text j = TEXT[j][i].
IMAGE = np.eye(3, dtype=np.float32)
TEXT = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], np.float32)
SIM = [[1.0, 0.6, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 1.0]]


def _lse(values):
    return math.log(sum(math.exp(v) for v in values))


def test_info_nce_on_a_3x3_similarity_by_hand():
    scale = 2.0
    logits = [[scale * s for s in row] for row in SIM]
    rows = sum(_lse(logits[i]) - logits[i][i] for i in range(3)) / 3
    columns = sum(_lse([logits[j][i] for j in range(3)]) - logits[i][i] for i in range(3)) / 3
    loss, metrics = info_nce_loss(IMAGE, TEXT, math.log(scale))
    assert float(metrics["image_to_text_loss"]) == pytest.approx(rows, rel=1e-6)
    assert float(metrics["text_to_image_loss"]) == pytest.approx(columns, rel=1e-6)
    assert float(loss) == pytest.approx((rows + columns) / 2, rel=1e-6)
    # Every row's and column's largest similarity is on the diagonal (row 0: 1 against 0.6; column 1: 0.8 against 0.6).
    assert float(metrics["image_to_text_accuracy"]) == 1.0 and float(metrics["text_to_image_accuracy"]) == 1.0


def test_info_nce_is_symmetric_in_its_two_sides():
    loss, metrics = info_nce_loss(IMAGE, TEXT, 1.3)
    swapped, swapped_metrics = info_nce_loss(TEXT, IMAGE, 1.3)
    assert float(loss) == pytest.approx(float(swapped), rel=1e-6)
    assert float(metrics["image_to_text_loss"]) == pytest.approx(float(swapped_metrics["text_to_image_loss"]), rel=1e-6)


def test_info_nce_temperature_gradient_matches_finite_differences_and_stops_at_the_clamp():
    rng = np.random.default_rng(0)
    image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 6, 5)))

    def f(t):
        return info_nce_loss(image, text, t)[0]

    t, h = 1.5, 1e-3
    numeric = (float(f(t + h)) - float(f(t - h))) / (2 * h)
    assert float(jax.grad(f)(t)) == pytest.approx(numeric, rel=2e-3)
    past = math.log(100.0) + 0.5  # beyond CLIP's clamp the scale is 100 and the loss no longer moves with t
    assert float(jax.grad(f)(past)) == 0.0
    assert float(info_nce_loss(image, text, past)[1]["logit_scale"]) == pytest.approx(100.0)


def test_sigmoid_loss_on_a_3x3_similarity_by_hand_and_its_gradients():
    scale, bias = 2.0, -1.0
    expected = -sum(math.log(1 / (1 + math.exp(-(1 if i == j else -1) * (scale * SIM[i][j] + bias))))
                    for i in range(3) for j in range(3)) / 3
    loss, _ = sigmoid_loss(IMAGE, TEXT, math.log(scale), bias)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    swapped, _ = sigmoid_loss(TEXT, IMAGE, math.log(scale), bias)
    assert float(swapped) == pytest.approx(expected, rel=1e-6)  # the pairs' labels do not depend on the side

    def f(t, b):
        return sigmoid_loss(IMAGE, TEXT, t, b)[0]

    h = 1e-3
    grads = jax.grad(f, argnums=(0, 1))(math.log(scale), bias)
    numeric_t = (float(f(math.log(scale) + h, bias)) - float(f(math.log(scale) - h, bias))) / (2 * h)
    numeric_b = (float(f(math.log(scale), bias + h)) - float(f(math.log(scale), bias - h))) / (2 * h)
    assert float(grads[0]) == pytest.approx(numeric_t, rel=2e-3)
    assert float(grads[1]) == pytest.approx(numeric_b, rel=2e-3)


@pytest.mark.parametrize("loss_fn", ["info_nce", "sigmoid"])
def test_rows_sharded_over_eight_devices_give_the_one_device_loss(loss_fn):
    """Negatives span the global batch: with the pairs split over 8 devices the loss is the unsplit one."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    rng = np.random.default_rng(1)
    image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 16, 8)).astype(np.float32))

    def loss(i, t):
        return info_nce_loss(i, t, 2.0)[0] if loss_fn == "info_nce" else sigmoid_loss(i, t, 2.0, -3.0)[0]

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data", None))
    sharded = jax.jit(loss)(jax.device_put(image, rows), jax.device_put(text, rows))
    whole = jax.jit(loss)(jnp.asarray(image), jnp.asarray(text))
    assert float(sharded) == pytest.approx(float(whole), rel=1e-6)
    per_device = [float(loss(image[k:k + 2], text[k:k + 2])) for k in range(0, 16, 2)]
    assert float(whole) != pytest.approx(np.mean(per_device), rel=1e-3)  # local negatives only would differ
