"""Hugging Face checkpoints in and out: logits equal transformers' for every supported class, export loads in
transformers without missing or unexpected keys, and export then import is bit-identical.

The HF models are tiny and random, built in code and saved with `save_pretrained`; weights are drawn with a
large spread (std 0.2, norms away from 1, biases away from 0) so that a wrong mapping cannot hide in small
numbers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infra.mesh import logical_rules
from train.config import ConfigError, build_config
from train.hf import architectures
from train.hf.convert import export_checkpoint, import_checkpoint, imported_config
from train.hf.files import CheckpointFiles, write_shards
from train.inference import load_trained, params_of_run
from train.state import abstract_model
from train.tokenizer import load_tokenizer

TOLERANCE = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 280, (2, 24))


def require_torch():
    """transformers and torch; a skip, except where TESSERA_REQUIRE_TORCH makes their absence a failure."""
    if os.environ.get("TESSERA_REQUIRE_TORCH"):
        import torch  # noqa: F401
        import transformers
        return transformers
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def transformers():
    return require_torch()


@pytest.fixture(scope="module")
def one_device():
    placement = build_config({"mesh": {"data": 1}, "data": {"batch_size": 1}})
    from infra.mesh import build_mesh

    return build_mesh(placement, jax.devices()[:1]), logical_rules(placement)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    """A Llama-3-style byte-level BPE folder (BOS added by its post-processor), 280 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("hf-tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def forward(self, x): return self.linear(x) + 1"] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "mask_token": "[MASK]",
         "cls_token": "<|begin_of_text|>", "sep_token": "<|end_of_text|>"}))
    return folder


LLAMA = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CASES = {
    # head_dim 12 != 32/4, GQA, Llama 3.1's rope scaling (a short original context so that it bends these positions)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**LLAMA, "head_dim": 12, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama-tied-biased": ("LlamaConfig", "LlamaForCausalLM", {**LLAMA, "tie_word_embeddings": True,
                                                              "attention_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**LLAMA, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA, "head_dim": 16}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "mixtral-fused": ("MixtralConfig", "MixtralForCausalLM", {**LLAMA, "num_local_experts": 4,
                                                              "num_experts_per_tok": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=48,
                                                   max_position_embeddings=64)),
}


def build_hf(transformers, case: str, folder: Path, tokenizer_folder: Path):
    """A random HF model saved in `folder` with the tokenizer files -> (model, its logits on TOKENS)."""
    import torch

    config_class, model_class, kwargs = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**kwargs, attn_implementation="eager")
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if p.ndim == 1 and ("norm" in name.lower() or "ln_" in name):
                p.add_(1.0)  # norm scales around 1, still perturbed
    model.save_pretrained(folder)
    if case == "mixtral-fused":  # the layout transformers 5 holds in memory: gate_up_proj, down_proj
        for path in folder.glob("*.safetensors"):
            path.unlink()
        tensors = [(k, v.detach().numpy()) for k, v in model.state_dict().items() if k != "lm_head.weight"
                   or not config.tie_word_embeddings]
        write_shards(iter(tensors), folder, 2**40)
        assert "model.layers.0.mlp.experts.gate_up_proj" in CheckpointFiles(folder)
    for f in tokenizer_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits.numpy()
    return model, logits


def tessera_logits(run, scan_layers: bool) -> np.ndarray:
    cfg = run.cfg.model.model_copy(update={"scan_layers": scan_layers, "attention": "dense"})
    graphdef = abstract_model(cfg, run.cfg.precision.policy.model).graphdef
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(run.params, TOKENS))


@pytest.fixture(scope="module")
def imported(transformers, tokenizer_files, one_device, tmp_path_factory):
    """Per case: (HF model, its logits, the imported run loaded back, the HF folder)."""
    mesh, rules = one_device
    cache = {}

    def get(case: str):
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            model, logits = build_hf(transformers, case, root / "hf", tokenizer_files)
            import_checkpoint(root / "hf", root / "run", mesh, rules)
            cache[case] = (model, logits, load_trained(root / "run", mesh, rules), root)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_equal_transformers(case, imported):
    _, reference, run, _ = imported(case)
    for scan in (True, False):
        ours = tessera_logits(run, scan)
        print(f"{case} scan_layers={scan}: max |logit difference| {np.abs(ours - reference).max():.2e}")  # -s
        np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=TOLERANCE, err_msg=f"scan_layers={scan}")


@pytest.mark.parametrize("case", ["llama", "qwen3", "mixtral", "gpt2", "bert"])
def test_exported_model_loads_in_transformers_with_the_same_logits(case, imported, transformers, tmp_path):
    """Import then export: transformers loads the folder with no missing or unexpected keys and computes the
    original model's logits (Mixtral's fused layout is written back in the per-expert one)."""
    import torch

    _, reference, run, _ = imported(case)
    out = export_checkpoint(run.cfg, run.params, tmp_path / "exported", shard_bytes=8_000 if case == "llama" else 2**40)
    if case == "llama":
        assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    auto = transformers.AutoModelForMaskedLM if case == "bert" else transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = model.eval()(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(logits, reference, atol=TOLERANCE, rtol=TOLERANCE)


def test_a_wrong_mapping_is_caught(imported, monkeypatch, one_device, tmp_path):
    """The negative control: gate and up projections swapped in the table give logits far from transformers'."""
    import dataclasses

    _, reference, _, root = imported("qwen2")
    arch = architectures.ARCHITECTURES["qwen2"]
    swap = {"gate_proj": "up_proj", "up_proj": "gate_proj"}

    def swapped(cfg, stack, layout):
        return [dataclasses.replace(r, hf=tuple(re.sub("gate_proj|up_proj", lambda m: swap[m.group()], h) for h in r.hf))
                for r in arch.layer_rules(cfg, stack, layout)]

    monkeypatch.setitem(architectures.ARCHITECTURES, "qwen2", dataclasses.replace(arch, layer_rules=swapped))
    import_checkpoint(root / "hf", tmp_path / "wrong", *one_device)
    wrong = tessera_logits(load_trained(tmp_path / "wrong", *one_device), True)
    assert np.abs(wrong - reference).max() > 100 * TOLERANCE


def test_both_config_spellings_give_the_same_model(imported, tmp_path):
    """transformers 5 writes rope_parameters and dtype; 4.x wrote rope_theta, rope_scaling and torch_dtype."""
    _, _, run, root = imported("llama")
    hf = json.loads((root / "hf" / "config.json").read_text())
    assert "rope_parameters" in hf
    params = hf.pop("rope_parameters")
    legacy = {**hf, "rope_theta": params.pop("rope_theta"), "rope_scaling": params, "torch_dtype": hf.pop("dtype", None)}
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(legacy))
    (folder / "tokenizer.json").write_bytes((root / "hf" / "tokenizer.json").read_bytes())
    cfg, _ = imported_config(folder, tmp_path / "run", "float32", None)
    assert cfg.model == run.cfg.model and cfg.model.rope_scaling.original_max_seq_len == 16


def test_imported_tokenizer_encodes_as_the_file_does(imported):
    from tokenizers import Tokenizer

    _, _, run, root = imported("llama")
    text = "def forward(self, x):\n    return x + 1  # é"
    reference = Tokenizer.from_file(str(root / "hf" / "tokenizer.json")).encode(text).ids
    assert load_tokenizer(run.cfg.data.tokenizer).encode(text).tolist() == reference
    assert reference[0] == run.tokenizer.bos_id  # BOS, as add_special_tokens=True adds it


def test_export_then_import_is_bit_identical_without_torch(one_device, tmp_path):
    """A random Tessera model (not from HF) written as a Llama folder and read back: the same bits."""
    mesh, rules = one_device
    cfg = build_config({"model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48,
                                  "vocab_size": 272, "max_seq_len": 64, "init_std": 0.2, "qkv_bias": True,
                                  "attention_out_bias": True}, "data": {"seq_len": 32},
                        "run": {"dir": str(tmp_path / "run")}})
    model = abstract_model(cfg.model, cfg.precision.policy.model)
    from model.transformer import Transformer

    params = nnx.to_pure_dict(nnx.split(Transformer(cfg.model, nnx.Rngs(3)))[1])
    folder = export_checkpoint(cfg, params, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    import_checkpoint(folder, tmp_path / "back", mesh, rules)
    back = load_trained(tmp_path / "back", mesh, rules)
    same = {"name": "x", "init_std": 0.2}  # what HF configs do not carry
    assert back.cfg.model.model_copy(update=same) == cfg.model.model_copy(update=same)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(model.params) == jax.tree.structure(back.params)
    # The byte tokenizer went out as a tokenizer.json with the same ids.
    assert load_tokenizer(str(folder / "tokenizer.json")).encode("héllo").tolist() == list("héllo".encode())


def test_a_random_tessera_model_exports_with_its_logits(transformers, tmp_path):
    import torch

    cfg = build_config({"model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48,
                                  "vocab_size": 272, "max_seq_len": 64, "init_std": 0.2, "qk_norm": True},
                        "data": {"seq_len": 32}})
    from model.transformer import Transformer

    model = Transformer(cfg.model, nnx.Rngs(5))
    params = nnx.to_pure_dict(nnx.split(model)[1])
    folder = export_checkpoint(cfg, params, tmp_path / "hf")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                                     attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = TOKENS % 272
    with torch.no_grad():
        reference = loaded.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(tokens)), reference, atol=TOLERANCE, rtol=TOLERANCE)


def test_init_from_refuses_another_model_naming_the_parameter(imported):
    _, _, run, root = imported("llama")
    other = run.cfg.model.model_copy(update={"d_ff": 64})
    abstract = abstract_model(other, run.cfg.precision.policy.model).params
    with pytest.raises(ConfigError, match=r"parameter blocks/mlp/wg is shape \[2, 32, 48\] there but shape \[2, 32, 64\]"):
        params_of_run(root / "run", other, abstract)


def _refused(folder: Path, out: Path, one_device) -> str:
    with pytest.raises(ConfigError) as e:
        import_checkpoint(folder, out, *one_device)
    assert not out.exists(), "nothing is written before a refusal"
    message = str(e.value)
    assert "\n" not in message
    return message


def test_refusals_name_the_field_and_write_nothing(imported, one_device, tmp_path):
    _, _, _, root = imported("llama")
    source = root / "hf"
    hf = json.loads((source / "config.json").read_text())

    def variant(name: str, config: dict, tensors=None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for f in source.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "config.json").write_text(json.dumps(config))
        if tensors is not None:
            (folder / "model.safetensors").unlink()
            write_shards(iter(tensors), folder, 2**40)
        return folder

    out = tmp_path / "out"
    assert "model_type='falcon'" in _refused(variant("type", {**hf, "model_type": "falcon"}), out, one_device)
    yarn = {**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}
    assert "rope_type='yarn'" in _refused(variant("yarn", yarn), out, one_device)
    assert "attention_dropout=0.1" in _refused(variant("dropout", {**hf, "attention_dropout": 0.1}), out, one_device)
    files = CheckpointFiles(source)
    tensors = [(n, np.array(files.get(n))) for n in files.names()]
    missing = [(n, a) for n, a in tensors if n != "model.layers.1.self_attn.k_proj.weight"]
    assert "no tensor model.layers.1.self_attn.k_proj.weight" in _refused(variant("missing", hf, missing), out,
                                                                          one_device)
    wrong = [(n, a[:, :-1] if n == "model.layers.0.mlp.up_proj.weight" else a) for n, a in tensors]
    assert "model.layers.0.mlp.up_proj.weight has shape [48, 31]; config.json implies [48, 32]" in _refused(
        variant("shape", hf, wrong), out, one_device)
    extra = tensors + [("model.layers.2.mlp.up_proj.weight", tensors[0][1])]
    assert "model.layers.2.mlp.up_proj.weight" in _refused(variant("extra", hf, extra), out, one_device)


def run_cli(*args, timeout=600):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_import_train_sample_export_from_the_command_line(imported, transformers, tmp_path):
    """A tiny Llama through the CLI: imported, trained 10 steps (the loss falls), sampled, exported and loaded by
    transformers; a refused import exits 2 with one line and writes nothing."""
    _, _, _, root = imported("llama")
    run = tmp_path / "run"
    done = run_cli("import-hf", str(root / "hf"), "--out", str(run))
    assert done.returncode == 0, done.stderr
    done = run_cli("train", str(run), "train.steps=10", "train.log_every=1", "train.eval_every=10",
                   "data.max_documents=200", "data.batch_size=8", "data.seq_len=32", "optimizer.warmup_steps=2")
    assert done.returncode == 0, done.stderr
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    done = run_cli("sample", str(run), "--prompt", "def forward", "--max-new-tokens", "5", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)[0]["completions"][0]["tokens"]) >= 1
    done = run_cli("export-hf", str(run), "--out", str(tmp_path / "exported"), "--shard-size", "20KB")
    assert done.returncode == 0, done.stderr
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    done = run_cli("import-hf", str(bad), "--out", str(tmp_path / "never"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "model_type='falcon'" in done.stderr
    assert not (tmp_path / "never").exists()


def test_export_refuses_what_the_class_cannot_express(tmp_path):
    from model.config import ModelConfig

    biased = ModelConfig(n_layers=1, d_model=32, n_heads=4, d_ff=48, vocab_size=272, sliding_window=8, qkv_bias=True)
    with pytest.raises(ConfigError, match=r"MistralForCausalLM has no qkv_bias"):
        architectures.ARCHITECTURES["mistral"].write_config(biased)
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM has no sliding_window"):
        architectures.ARCHITECTURES["llama"].write_config(biased)
    assert architectures.architecture_for(biased).hf_class == "Qwen2ForCausalLM"  # q/k/v biases alone
    cfg = build_config({"model": biased.model_dump(), "data": {"seq_len": 32}})
    with pytest.raises(ConfigError, match="Qwen2"):
        export_checkpoint(cfg, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_old_layernorm_names_are_read_and_a_truncated_file_is_named(imported, tmp_path):
    _, _, _, root = imported("bert")
    files = CheckpointFiles(root / "hf")
    renamed = [(re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", n)),
                np.array(files.get(n))) for n in files.names()]
    (tmp_path / "old").mkdir()
    write_shards(iter(renamed), tmp_path / "old", 2**40)
    assert any(n.endswith("LayerNorm.gamma") for n, _ in renamed)
    old = CheckpointFiles(tmp_path / "old")
    assert sorted(old.names()) == sorted(files.names())
    name = "bert.embeddings.LayerNorm.weight"
    assert np.array_equal(old.get(name), files.get(name))
    path = tmp_path / "old" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="is damaged or truncated: tensor"):
        CheckpointFiles(tmp_path / "old")


# ---------------------------------------------------------------- CLIP: a dual encoder in and out

CAPTIONS = ["a red circle", "two blue squares", "a small green triangle"]


@pytest.fixture(scope="module")
def clip_folder(transformers, tmp_path_factory) -> Path:
    """A random CLIPModel (text 32 wide, image 48 wide on 16 px in 4 px patches) saved with a CLIP-style tokenizer
    (its post-processor puts <|startoftext|> and <|endoftext|> around a text) and OpenAI's image statistics."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("hf-clip")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CAPTIONS * 20, trainer=trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=20, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4), projection_dim=24, attn_implementation="eager")
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if p.ndim == 1 and "norm" in name.lower():
                p.add_(1.0)
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def hf_clip_logits(transformers, folder: Path, images: np.ndarray) -> np.ndarray:
    """logits_per_image of the CLIPModel in `folder`, its own tokenizer and image processor preparing the inputs."""
    import torch
    from PIL import Image

    model = transformers.CLIPModel.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                     pad_token="<|endoftext|>")
    text = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    pixels = transformers.CLIPImageProcessor.from_pretrained(folder)(
        images=[Image.fromarray(i) for i in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        return model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels).logits_per_image.numpy()


def tessera_clip_logits(run, images: np.ndarray) -> np.ndarray:
    """The same through Tessera: its caption pipeline (tokens, end token last) and its model."""
    from train.data.image_text import tokenized_captions

    tokens, lengths = tokenized_captions(run.tokenizer, CAPTIONS, run.cfg.data.seq_len)
    model = nnx.merge(run.model.graphdef, run.params)
    image, text = model(images, tokens, lengths)
    return np.asarray(jnp.exp(model.log_scale.get_value()) * image @ text.T)


@pytest.mark.slow  # 15 s: the fast tier stays under 4 minutes
def test_clip_imports_and_exports_with_transformers_logits(clip_folder, transformers, one_device, tmp_path):
    """CLIPModel in (weights, the tokenizer's start and end tokens, the image processor's statistics) gives
    transformers' logits; written back out, transformers loads it without missing keys and gives them again."""
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    reference = hf_clip_logits(transformers, clip_folder, images)
    import_checkpoint(clip_folder, tmp_path / "run", *one_device)
    run = load_trained(tmp_path / "run", *one_device)
    assert run.cfg.model.clip.vision.pixel_mean == architectures.OPENAI_CLIP_MEAN and run.cfg.data.source == "images"
    np.testing.assert_allclose(tessera_clip_logits(run, images), reference, atol=TOLERANCE, rtol=TOLERANCE)
    # Training the imported run starts from its parameters (a parameters-only checkpoint at step 0).
    from PIL import Image

    from train.contrastive_loop import ContrastiveTrainer
    from train.recipes import with_overrides

    records = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "text": CAPTIONS[i % 3], "split": ["train", "heldout"][i % 2]})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    trainer = ContrastiveTrainer(with_overrides(run.cfg, [f"data.paths=[{tmp_path / 'pairs.jsonl'}]",
                                                          "data.batch_size=2"]), *one_device)
    try:
        assert trainer.start == 0
        assert float(trainer.state["params"]["log_scale"]) == float(run.params["log_scale"])
    finally:
        trainer.checkpointer.close()

    out = export_checkpoint(run.cfg, run.params, tmp_path / "hf")
    loaded, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = transformers.CLIPModel.from_pretrained(clip_folder).state_dict()
    for name, tensor in loaded.state_dict().items():
        if "position_ids" not in name:
            assert np.array_equal(tensor.numpy(), original[name].numpy()), name
    np.testing.assert_allclose(hf_clip_logits(transformers, out, images), reference, atol=TOLERANCE, rtol=TOLERANCE)


def test_clip_refusals_name_the_field():
    from model.config import ModelConfig

    arch = architectures.ARCHITECTURES["clip"]
    text = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 20, "eos_token_id": 281}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 8, "patch_size": 4}
    assert arch.read_config({"text_config": text, "vision_config": vision, "projection_dim": 8})["mlp"] == "quick_gelu"
    for bad, field in (({**text, "eos_token_id": 2}, "text_config.eos_token_id=2"),
                       ({**text, "hidden_act": "gelu"}, "vision_config.hidden_act='quick_gelu'"),
                       ({**text, "attention_dropout": 0.1}, "attention_dropout=0.1")):
        with pytest.raises(ConfigError, match=re.escape(field)):
            arch.read_config({"text_config": bad, "vision_config": vision, "projection_dim": 8})

    clip = {"embed_dim": 16, "vision": {"image_size": 8, "patch_size": 4, "n_layers": 1, "d_model": 16, "n_heads": 2,
                                        "d_ff": 32, "pooling": "mean"}}
    tower = dict(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=272, norm="layernorm", mlp="quick_gelu",
                 position="learned", qkv_bias=True, attention_out_bias=True, mlp_bias=True)
    with pytest.raises(ConfigError, match=r"model\.clip\.vision\.pooling=mean"):
        architectures.ARCHITECTURES["clip"].write_config(ModelConfig(**tower, clip=clip))
    sigmoid = {**clip, "loss": "sigmoid", "vision": {**clip["vision"], "pooling": "class"}}
    with pytest.raises(ConfigError, match=r"model\.clip\.loss=sigmoid"):
        architectures.ARCHITECTURES["clip"].write_config(ModelConfig(**tower, clip=sigmoid))
