"""Post-training: the pairwise losses against hand computations, chat templates and data, LoRA adapters, the
reward model's score head, and the train step on pairs (one device against a sharded mesh)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import mesh_for, tiny_config
from model import lora
from model.config import ModelConfig
from model.transformer import Transformer
from train.config import ConfigError, PreferenceConfig
from train.data.chat import ChatDataError, ChatTemplate, parse_chat, parse_preference
from train.data.reader import PreparedData
from train.objectives.cross_entropy import cross_entropy_sums
from train.objectives.preference import bradley_terry, preference_loss
from train.program import build_program
from train.state import Trainable
from train.tokenizer import ByteTokenizer

# ---------------------------------------------------------------- losses by hand


def dpo(pc, pr, rc, rr, **kw):
    return float(preference_loss("dpo", jnp.float32(pc), jnp.float32(pr), jnp.float32(rc), jnp.float32(rr),
                                 beta=0.1, **kw))


def test_dpo_values_by_hand():
    assert dpo(-10, -12, -11, -11) == pytest.approx(0.598139, abs=1e-6)
    assert dpo(-10, -12, -11, -11, label_smoothing=0.1) == pytest.approx(0.618139, abs=1e-6)
    assert dpo(-7, -9, -7, -9) == pytest.approx(math.log(2), abs=1e-7)  # policy = reference


def test_ipo_hinge_simpo_and_bradley_terry_by_hand():
    h = (-10 - -11) - (-12 - -11)  # 2 nats
    ipo = preference_loss("ipo", -10.0, -12.0, -11.0, -11.0, beta=0.1)
    assert float(ipo) == pytest.approx((h - 1 / (2 * 0.1)) ** 2, abs=1e-5)  # (2 - 5)^2 = 9
    assert float(preference_loss("hinge", -10.0, -12.0, -11.0, -11.0, beta=0.1)) == pytest.approx(1 - 0.2, abs=1e-6)
    simpo = preference_loss("simpo", -10.0, -12.0, beta=2.0, simpo_gamma=0.5, chosen_tokens=5.0, rejected_tokens=4.0)
    assert float(simpo) == pytest.approx(math.log1p(math.exp(-(2.0 * (-2.0 + 3.0) - 0.5))), abs=1e-6)
    assert float(bradley_terry(1.5, 0.5)) == pytest.approx(0.313262, abs=1e-6)
    assert float(bradley_terry(1.5, 0.5, margin=0.5)) == pytest.approx(0.474077, abs=1e-6)
    assert float(bradley_terry(1.5, 0.5, centering=0.1)) == pytest.approx(0.313262 + 0.1 * 4.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "hinge", "simpo", "bt"])
def test_loss_gradients_match_central_differences(kind):
    x = np.array([-10.3, -12.1, -11.2, -10.7], np.float64)

    def loss(v):
        if kind == "bt":
            return bradley_terry(v[0], v[1], margin=0.3, centering=0.05)
        return preference_loss(kind, v[0], v[1], v[2], v[3], beta=0.7, label_smoothing=0.1, simpo_gamma=0.4,
                               chosen_tokens=3.0, rejected_tokens=5.0)

    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(loss)(jnp.asarray(x)))
        eps = 1e-6
        numeric = [(float(loss(jnp.asarray(x + eps * e))) - float(loss(jnp.asarray(x - eps * e)))) / (2 * eps)
                   for e in np.eye(4)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- chats


def test_a_chat_is_its_turns_tokenized_alone_plus_role_markers():
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Shout: hi"},
                {"role": "assistant", "content": "HI"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "HI!"}]
    tokens, marks = ChatTemplate(tok).encode(messages)
    expected, learn = [], []
    for m in messages:
        body = [*tok.encode(m["content"]), tok.eod_id]
        expected += [tok.special[f"<|{m['role']}|>"], *body]
        learn += [0] + [int(m["role"] == "assistant")] * len(body)
    assert tokens.tolist() == expected and marks.tolist() == learn
    prompt = ChatTemplate(tok).prompt(messages[:2])
    assert prompt.tolist() == expected[: len(prompt) - 1] + [tok.special["<|assistant|>"]]


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'; a role is one of system, user, assistant"),
    ({"prompt": "hi", "completion": "  "}, "'completion' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"text": "hi"}, "needs 'messages', or 'prompt' and 'completion'"),
])
def test_bad_chat_lines_are_refused_naming_the_line(line, message):
    with pytest.raises(ChatDataError, match=f"^f.jsonl:3: .*{message[:30]}".replace("(", r"\(").replace("'", "'")):
        parse_chat(line, "f.jsonl:3")


def test_a_preference_line_needs_rejected():
    with pytest.raises(ChatDataError, match="f.jsonl:1: no string 'rejected' field"):
        parse_preference({"prompt": "p", "chosen": "a"}, "f.jsonl:1")


def _prepare(tmp_path, kind, lines, seq_len):
    from train.data.prepare import prepare
    from train.data.sources import FileSource

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepare(FileSource(kind, (str(path),)), "byte", tmp_path / kind, heldout_fraction=0.0)
    return PreparedData(tmp_path / kind).stream("train", seq_len, None)


def test_malformed_jsonl_is_refused_with_its_line(tmp_path):
    from train.data.prepare import prepare
    from train.data.sources import FileSource

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        prepare(FileSource("chat", (str(tmp_path / "bad.jsonl"),)), "byte", tmp_path / "out")


CHATS = [{"prompt": f"Shout: {w}", "completion": w.upper()} for w in ("abc", "hello", "xy", "tessera", "jax")]


def test_prompt_tokens_get_exactly_zero_gradient(tmp_path):
    rows = _prepare(tmp_path, "chat", CHATS, 64).rows(np.arange(1))
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(*rows["inputs"].shape, 264)), jnp.float32)
    grad = jax.grad(lambda x: cross_entropy_sums(x, rows["targets"], rows["weights"])[0])(logits)
    assert np.all(np.asarray(grad)[rows["weights"] == 0] == 0) and np.any(np.asarray(grad)[rows["weights"] > 0] != 0)
    tok = ByteTokenizer()  # what is learned: each completion and its end token, nothing of the prompts
    learned = rows["targets"][rows["weights"] > 0].tolist()
    assert learned == [t for c in CHATS[:len(learned)] for t in [*tok.encode(c["completion"]), tok.eod_id]][:len(learned)]


def test_packed_and_unpacked_conversations_give_the_same_loss(tmp_path):
    packed = _prepare(tmp_path / "a", "chat", CHATS, 128)
    alone = _prepare(tmp_path / "b", "chat", CHATS, 24)
    assert packed.n_rows == 1 and alone.n_rows == len(CHATS)  # whole conversations, never split
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=264, max_seq_len=128)
    model = Transformer(cfg, nnx.Rngs(0))

    def loss_sum(rows):
        logits = model(jnp.asarray(rows["inputs"]), jnp.asarray(rows["positions"]), jnp.asarray(rows["segment_ids"]))
        return float(cross_entropy_sums(logits, rows["targets"], rows["weights"])[0]), rows["weights"].sum()

    (a, wa), (b, wb) = loss_sum(packed.rows(np.arange(1))), loss_sum(alone.rows(np.arange(len(CHATS))))
    assert wa == wb and a == pytest.approx(b, rel=1e-5)


def test_conversations_longer_than_the_context_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="conversation .* tokens, longer than data.seq_len=8 allows"):
        _prepare(tmp_path, "chat", CHATS, 8)


# ---------------------------------------------------------------- LoRA and the score head


def _models(**lora_cfg):
    base_cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=264, max_seq_len=32)
    cfg = base_cfg.model_copy(update={"lora": lora.LoraConfig(**lora_cfg)} if lora_cfg else {})
    return base_cfg, cfg


def test_lora_with_zero_b_is_the_base_model_and_merges_exactly():
    base_cfg, cfg = _models(rank=4, targets=("attention", "mlp", "lm_head"))
    base = Transformer(base_cfg, nnx.Rngs(0))
    adapted = Transformer(cfg, nnx.Rngs(1))
    adapters = Trainable(True).part(nnx.to_pure_dict(nnx.state(adapted)))
    params = Trainable.join(adapters, nnx.to_pure_dict(nnx.state(base)))  # the base's weights, fresh adapters
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    graphdef = nnx.graphdef(adapted)
    np.testing.assert_array_equal(nnx.merge(graphdef, params)(tokens), base(tokens))  # B = 0: bit for bit
    rng = np.random.default_rng(1)
    trained = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.asarray(rng.normal(size=v.shape) * 0.05, v.dtype)
        if str(getattr(p[-1], "key", p[-1])) == "b" and lora.is_adapter(tuple(str(getattr(k, "key", k)) for k in p))
        else v, params)
    adapted_out = nnx.merge(graphdef, trained)(tokens)
    assert not np.allclose(adapted_out, base(tokens))
    merged = lora.merge(trained, cfg.lora.alpha / cfg.lora.rank)
    merged_out = nnx.merge(nnx.graphdef(base), merged)(tokens)
    np.testing.assert_allclose(merged_out, adapted_out, rtol=1e-4, atol=1e-4)


def test_lora_rank_and_targets_are_checked():
    with pytest.raises(ConfigError, match="model.lora.rank=0 is not allowed"):
        tiny_config("model.lora.rank=0")
    with pytest.raises(ConfigError, match="model.lora.targets"):
        tiny_config("model.lora.targets=[convolutions]")
    with pytest.raises(ConfigError, match="tie_embeddings"):
        tiny_config("model.lora.targets=[lm_head]", "model.tie_embeddings=true")


def test_the_score_is_read_at_the_end_token_whatever_the_padding():
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=264, max_seq_len=64, score_head=True)
    model = Transformer(cfg, nnx.Rngs(0))
    model.score.set_value(jnp.asarray(np.random.default_rng(0).normal(size=32), jnp.float32))
    ids = np.array([5, 6, 7, 8, 257], np.int32)

    def score(width, pad):
        row = np.full((1, width), pad, np.int32)
        row[0, : len(ids)] = ids
        seg = (np.arange(width) < len(ids)).astype(np.int32)[None]
        x, _, _ = model.hidden(jnp.asarray(row), jnp.arange(width)[None], jnp.asarray(seg))
        return float(model.scores(x, jnp.array([len(ids) - 1]))[0])

    assert score(8, 256) == pytest.approx(score(32, 3), abs=1e-5) and score(8, 256) != 0


# ---------------------------------------------------------------- the step on pairs, sharded


PAIRS = [{"prompt": f"Shout: {w}", "chosen": w.upper(), "rejected": w} for w in
         ("abc", "hello", "xy", "tessera", "jax", "mesh", "grain", "flax")]


@pytest.fixture(scope="module")
def pair_rows(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("pairs"), "preferences", PAIRS, 32).rows(np.arange(8))


def _pair_step(rules, rows, sharded, *overrides):
    layout = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2") if sharded else ("mesh.data=1",)
    cfg = tiny_config(*layout, "train.steps=10", "optimizer.warmup_steps=0",
                      "model.lora.rank=4", "model.lora.targets=[attention,mlp]", *overrides)
    program = build_program(cfg, mesh_for(cfg, 8 if sharded else 1), rules)
    state = program.init_state()
    before = jax.device_get(state["params"])
    state, metrics = program.train_step(state, program.device_batch(rows))
    return program, before, jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.parametrize("objective", ["preference", "reward"])
def test_lora_pair_step_trains_only_adapters_and_equals_one_device(rules, pair_rows, objective):
    extra = ("train.objective=reward", "model.score_head=true") if objective == "reward" else \
        ("train.objective=preference",)
    program, before, after, m1 = _pair_step(rules, pair_rows, False, *extra)
    _, _, sharded_after, m8 = _pair_step(rules, pair_rows, True, *extra)
    flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in p): v  # noqa: E731
                      for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    b, a, s = flat(before), flat(after), flat(sharded_after)
    for path in b:
        if lora.is_adapter(tuple(path.split("/"))) or path == "score":
            continue
        np.testing.assert_array_equal(a[path], b[path])  # the base is frozen, bit for bit
    # What learns first: the adapters of a policy; a reward model's zero score head (which passes no gradient back
    # to the adapters until it is no longer zero).
    learned = "score" if objective == "reward" else "blocks/attn/lora_wq/b"
    assert not np.array_equal(a[learned], b[learned])
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    for path in a:
        np.testing.assert_allclose(s[path], a[path], rtol=1e-4, atol=1e-6)
    if objective == "preference":  # the reference is the base: before any update, the margin is 0, the loss ln 2
        assert m1["loss"] == pytest.approx(math.log(2), abs=1e-6) and m1["preference_reward_margin"] == 0
    trained, moments = program.trained_sizes()
    assert trained < program.parameter_count() / 5
    assert 2 * 4 * trained <= moments < 2 * 4 * trained + 64  # Adam's two float32 moments (and its step count)


def test_adapters_shard_by_the_rules(rules):
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.lora.rank=4")
    program = build_program(cfg, mesh_for(cfg, 8), rules)
    shardings = program.shardings["params"]["blocks"]["attn"]
    wq = tuple(shardings["wq"].spec)  # [layers, embed, heads, head_dim]
    assert tuple(shardings["lora_wq"]["a"].spec) == (*wq[:2], None) and "fsdp" in str(wq[1])
    assert tuple(shardings["lora_wq"]["b"].spec) == (wq[0], None, *wq[2:]) and "tensor" in str(wq[2])


def test_preference_without_a_reference_is_refused():
    with pytest.raises(ConfigError, match="set train.init_from=RUN"):
        tiny_config("train.objective=preference")
    assert tiny_config("train.objective=preference", "preference.loss=simpo").preference == \
        PreferenceConfig(loss="simpo")
    with pytest.raises(ConfigError, match="needs model.score_head=true"):
        tiny_config("train.objective=reward")


def test_qlora_trains_adapters_on_an_int8_base(rules, pair_rows):
    """QLoRA: the adapters learn on a weight-only int8 base, which stays exactly as quantized."""
    cfg = tiny_config("train.steps=10", "optimizer.warmup_steps=0", "model.lora.rank=4",
                      "model.weight_quant.method=int8-weight-only", "train.objective=preference")
    program = build_program(cfg, mesh_for(cfg, 1), rules)
    state = program.init_state()
    before = jax.device_get(state["params"])
    batch = program.device_batch(pair_rows)
    for _ in range(2):
        state, metrics = program.train_step(state, batch)
    after = jax.device_get(state["params"])
    wq = before["blocks"]["attn"]["wq"]
    assert hasattr(wq, "qvalue") and wq.qvalue.dtype == jnp.int8  # the base really is quantized
    np.testing.assert_array_equal(after["blocks"]["attn"]["wq"].qvalue, wq.qvalue)
    assert not np.array_equal(after["blocks"]["attn"]["lora_wq"]["b"], before["blocks"]["attn"]["lora_wq"]["b"])
    assert np.isfinite(metrics["loss"]) and metrics["loss"] < math.log(2)  # the second step already prefers chosen


@pytest.mark.parametrize("case, expected", [
    ("role", "chat.jsonl:2: messages[0] has role 'robot'"),
    ("rejected", "prefs.jsonl:1: no string 'rejected' field"),
    ("long", "longer than data.seq_len=32 allows"),
    ("rank", "model.lora.rank=0 is not allowed"),
    ("target", "model.lora.targets"),
])
def test_bad_post_training_input_is_one_line_exit_2_and_writes_no_run(capsys, tmp_path, case, expected):
    from tests.conftest import TINY_DATA, TINY_MODEL, refused

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    long_chat = tmp_path / "long.jsonl"
    # Enough lines that the held-out split (by a hash of each line's key, which holds the path) leaves both sides some.
    long_chat.write_text("".join(json.dumps(c) + "\n" for c in [{"prompt": "x" * 40, "completion": "y"}, *CHATS * 4]))
    data = {"role": ["data.source=chat", f"data.paths=[{chat}]"],
            "rejected": ["data.source=preferences", f"data.paths=[{prefs}]", "train.objective=preference",
                         "preference.loss=simpo"],
            "long": ["data.source=chat", f"data.paths=[{long_chat}]", "data.heldout_fraction=0.5"],
            "rank": ["model.lora.rank=0"], "target": ["model.lora.targets=[convolutions]"]}[case]
    refused(capsys, ["train", *TINY_MODEL, *TINY_DATA, "mesh.data=-1", f"run.dir={tmp_path / 'run'}", *data], expected)
    assert not (tmp_path / "run").exists()
