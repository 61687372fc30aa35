"""Post-training weight-only quantization: a trained run's latest checkpoint -> a serving run
directory whose matmul weights are int8 or int4 (qwix) with per-channel or per-group scales,
and a report of what it cost and saved: parameter bytes, held-out bits per byte, decode speed.

The new run directory's config is the original's plus `model.weight_quant`; its checkpoint
holds the quantized parameters and the step, so `tessera sample` and `tessera eval` load it
like any run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig, WeightQuantConfig
from model.precision import QuantizationError, quantize_weight, quantized_bytes
from model.transformer import Transformer
from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig, OptionError, build_config
from train.inference import TrainedRun
from train.run_dir import write_config
from train.state import abstract_model, param_shardings

NOT_QUANTIZABLE = {
    "router": "the MoE router runs in float32 by design (routing decisions flip on small errors)",
    "embed": "embeddings are a lookup table, not a matmul",
    "norm": "norm scales are vectors applied in float32",
}


def quantizable_weights(cfg: ModelConfig) -> dict[tuple, tuple[str, int, int]]:
    """path -> (role, contracted axes, output axes) of every matmul weight of this model."""
    state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[1]
    return {
        tuple(path): v.get_metadata()["quant"] for path, v in nnx.to_flat_state(state) if "quant" in v.get_metadata()
    }


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def quantize_params(params, cfg: ModelConfig, wq: WeightQuantConfig):
    """The float parameters with every weight of wq.layers quantized (a new tree). On abstract
    shapes (jax.eval_shape) it checks a request without reading any weights."""
    specs = quantizable_weights(cfg)

    def quantize(path, w):
        path = tuple(k.key for k in path)
        role, contract, outputs = specs.get(path, (None, 0, 0))
        return quantize_weight(w, contract, outputs, wq, _path_name(path)) if role in wq.layers else w

    return jax.tree_util.tree_map_with_path(quantize, params)


def quantized_config(source: ExperimentConfig, out: Path, wq: WeightQuantConfig) -> ExperimentConfig:
    """The serving run's config: the source's, weight-quantized (a QAT run's fake quantization ends here)."""
    tree = source.model_dump(mode="json")
    tree["model"].update(weight_quant=wq.model_dump(mode="json"), qat=None)
    tree["run"]["dir"] = str(out)
    return build_config(tree)


def check_request(source: ExperimentConfig, out: Path, wq: WeightQuantConfig) -> list[str]:
    """The weights wq would quantize (names), or one clear error for what it cannot do; reads no weights."""
    if source.model.weight_quant is not None:
        raise ConfigError(f"{source.run.dir} is already quantized ({source.model.weight_quant.method}); "
                          "quantize its float source run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptionError("{out} {path} is not an empty directory; choose a new directory for the quantized run", path=out)
    quantized_config(source, out, wq)  # e.g. lm_head of a tied model is refused here
    cfg = source.model
    weights = quantizable_weights(cfg)
    chosen = {path: spec for path, spec in weights.items() if spec[0] in wq.layers}
    if not chosen:
        roles = sorted({role for role, _, _ in weights.values()})
        raise ConfigError(f"this model has no {'/'.join(wq.layers)} weights to quantize; it has: {', '.join(roles)}")
    try:
        jax.eval_shape(lambda p: quantize_params(p, cfg, wq), abstract_model(cfg, source.precision.policy.model).params)
    except QuantizationError as e:
        raise ConfigError(str(e)) from None
    return [_path_name(p) for p in chosen]


def param_bytes(params) -> int:
    is_q = lambda x: hasattr(x, "qvalue")  # noqa: E731
    return sum(quantized_bytes(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_q))


def write_quantized(run: TrainedRun, out: Path, wq: WeightQuantConfig, mesh, rules):
    """Quantize run's parameters onto the mesh and save them as the run directory `out`
    -> (the quantized config, the quantized parameters)."""
    check_request(run.cfg, out, wq)
    cfg = quantized_config(run.cfg, out, wq)
    shardings = param_shardings(abstract_model(cfg.model, cfg.precision.policy.model), mesh, rules)
    params = jax.jit(lambda p: quantize_params(p, run.cfg.model, wq), out_shardings=shardings)(run.params)
    checkpointer = Checkpointer(out / "checkpoints", cfg.checkpoint)
    try:
        checkpointer.save(run.step, {"params": params, "step": jnp.asarray(run.step, jnp.int32)}, {}, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    write_config(cfg)
    return cfg, params


def heldout_bits_per_byte(run_cfg, graphdef, params, tokenizer, corpus, mesh, rules) -> float:
    from train.evaluate import Scorer, metrics

    scorer = Scorer(graphdef, jax.tree.map(lambda a: a.sharding, params), tokenizer, mesh, rules,
                    run_cfg.data.batch_size)
    rows = run_cfg.data.batch_size * run_cfg.train.eval_batches
    return metrics(scorer.corpus(params, corpus.heldout, rows))["bits_per_byte"]


def decode_tokens_per_second(run_cfg, graphdef, params, tokenizer, prompts: list[str], mesh, rules,
                             new_tokens: int) -> float:
    """Greedy decoding of `new_tokens` per prompt, timed after a first (compiling) run."""
    from train.generation import Generator, SamplingOptions

    generator = Generator(run_cfg.model, graphdef, params, tokenizer, mesh, rules)
    opts = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0)
    generator.complete(prompts, opts)
    start = time.perf_counter()
    done = generator.complete(prompts, opts)
    seconds = time.perf_counter() - start
    return sum(len(c[0].tokens) for c in done) / seconds


def quantize_report(run: TrainedRun, cfg, params, mesh, rules, new_tokens: int = 32, prompts: int = 4) -> dict:
    """Bytes, held-out bits per byte and decode tokens/s of the original and the quantized model."""
    from train.data.corpus import load_corpus

    corpus = load_corpus(run.cfg)
    texts = [run.tokenizer.decode(corpus.heldout.rows(np.array([i]))["inputs"][0][:16]) for i in range(prompts)]
    quantized = abstract_model(cfg.model, cfg.precision.policy.model).graphdef
    report = {"method": cfg.model.weight_quant.method, "group_size": cfg.model.weight_quant.group_size,
              "layers": list(cfg.model.weight_quant.layers), "step": run.step}
    for name, graphdef, p, model_cfg in (("before", run.model.graphdef, run.params, run.cfg),
                                        ("after", quantized, params, cfg)):
        report[f"param_bytes_{name}"] = param_bytes(p)
        report[f"bits_per_byte_{name}"] = heldout_bits_per_byte(model_cfg, graphdef, p, run.tokenizer, corpus, mesh, rules)
        report[f"decode_tokens_per_sec_{name}"] = decode_tokens_per_second(
            model_cfg, graphdef, p, run.tokenizer, texts, mesh, rules, new_tokens
        )
    return report


def save_report(out: Path, report: dict) -> Path:
    path = out / "quantize_report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
