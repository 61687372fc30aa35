"""`tessera train [CONFIG | RUN_DIR] [overrides] [--force]`: train or resume an experiment."""

from __future__ import annotations

from infra.commands.arguments import add_run_arguments, split_config_arg
from train.config import ConfigError, ExperimentConfig
from train.recipes import load_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (the built-in default: a tiny decoder on the Python standard library)",
        description="Train or resume an experiment. CONFIG is a recipe YAML (or a model preset file); "
        "OVERRIDES are dotted key=value pairs such as train.steps=200 mesh.fsdp=4 run.dir=runs/x. "
        "An existing run.dir resumes from its latest checkpoint; CONFIG may also be that run directory. "
        "SIGTERM or Ctrl-C checkpoints and exits 0 (a second one aborts). Exit codes: 0 done or stopped "
        "cleanly, 2 bad input, 3 training diverged (non-finite steps), 130 aborted. "
        "`tessera config keys` lists every key.",
    )
    add_run_arguments(p, "experiment YAML, or a run directory (default: configs/experiments/tiny.yaml)")
    p.set_defaults(func=run)


def run(args) -> int:
    path, overrides = split_config_arg(args)
    return run_training(load_config(path, overrides), force=args.force, command="train")


def check_command(cfg: ExperimentConfig, command: str) -> None:
    """A config with a teacher is a distillation: it runs under `tessera distill`, and only there; one with an
    rl section runs under `tessera rl`."""
    if command == "distill" and cfg.distill is None:
        raise ConfigError("tessera distill needs a distill section: at least distill.teacher=TEACHER_RUN_DIR")
    if command == "rl" and cfg.rl is None:
        raise ConfigError("tessera rl needs an rl section: at least rl.rewards=[...] (see configs/experiments/grpo.yaml)")
    if command == "train" and cfg.distill is not None:
        raise ConfigError("this config has a distill section (a teacher); run it with `tessera distill`")
    if command != "rl" and cfg.rl is not None:
        raise ConfigError("this config has an rl section; run it with `tessera rl`")


def run_training(cfg: ExperimentConfig, force: bool = False, command: str = "train") -> int:
    """`tessera train`, `tessera distill` and `tessera rl`: one training loop, on this process's share of the job."""
    check_command(cfg, command)
    import jax

    from infra.distributed import start_from_env
    from infra.mesh import build_mesh, logical_rules
    from infra.runtime import StopOnSignal, enable_compilation_cache, local_peak_flops_or_none
    from train.contrastive_loop import train_contrastive
    from train.loop import train
    from train.rl_loop import train_rl

    start_from_env()  # joins a multi-process job when the environment describes one
    enable_compilation_cache()
    rules = logical_rules(cfg)
    mesh = build_mesh(cfg)
    # A quantized matmul's peak is another number than the compute dtype's: no MFU rather than a wrong one.
    peak = None if cfg.model.qat is not None else local_peak_flops_or_none(cfg.precision.policy.compute)
    stop = StopOnSignal()
    try:
        if command == "rl":
            result = train_rl(cfg, mesh, rules, force=force, stop_requested=stop)
        elif cfg.objective == "contrastive":
            result = train_contrastive(cfg, mesh, rules, force=force, stop_requested=stop, peak_flops_per_device=peak)
        else:
            result = train(cfg, mesh, rules, force=force, stop_requested=stop, peak_flops_per_device=peak)
    finally:
        stop.restore()
    if jax.process_index() != 0:  # the job's summary is printed once
        return 0
    if "stopped_at" in result:
        print(f"stopped by {stop.received or 'a signal to another process'} at step {result['stopped_at']}; "
              f"checkpoint saved in {result['run_dir']}/checkpoints; run `tessera {command} {result['run_dir']}` "
              "to resume")
        return 0
    if "eval_reward_mean" in result:
        print(f"final held-out reward over {cfg.rl.heldout_prompts} prompts: {result['eval_reward_mean']:.4f} -> "
              f"{result['run_dir']}")
    if "eval_retrieval_pairs" in result:
        zero_shot = (f", zero-shot accuracy {result['eval_zero_shot_accuracy']:.3f} over {result['eval_zero_shot_images']} "
                     f"images ({result['eval_zero_shot_classes']} classes, chance {1 / result['eval_zero_shot_classes']:.3f})"
                     if "eval_zero_shot_accuracy" in result else "")
        print(f"final held-out over {result['eval_retrieval_pairs']} image-text pairs: contrastive loss "
              f"{result['eval_loss']:.4f}, recall@1 image->text {result['eval_image_to_text_recall_at_1']:.3f} and "
              f"text->image {result['eval_text_to_image_recall_at_1']:.3f}, recall@5 "
              f"{result['eval_image_to_text_recall_at_5']:.3f} and {result['eval_text_to_image_recall_at_5']:.3f}"
              f"{zero_shot} -> {result['run_dir']}")
    if "eval_pairs" in result:
        margin = next(result[k] for k in ("eval_reward_margin", "eval_score_margin") if k in result)
        print(f"final held-out over {result['eval_pairs']} pairs: loss {result['eval_loss']:.4f}, preference accuracy "
              f"{result['eval_accuracy']:.3f}, margin {margin:.4f} -> {result['run_dir']}")
    if "eval_bits_per_byte" in result:
        bpb, base = result["eval_bits_per_byte"], result["unigram_bits_per_byte"]
        print(
            f"final held-out: cross entropy {result['eval_cross_entropy']:.4f} nats/token, perplexity "
            f"{result['eval_perplexity']:.3f}, bits per byte {bpb:.4f} (unigram baseline {base:.4f}, "
            f"{100 * (1 - bpb / base):.1f}% better) -> {result['run_dir']}"
        )
    return 0

