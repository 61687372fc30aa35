"""Composition root for commands: config -> devices -> mesh and rules -> train/."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from train.config import load_config

COMPILATION_CACHE = Path.home() / ".cache" / "tessera" / "jax"


def enable_compilation_cache() -> None:
    """Persist compiled programs so a resumed or repeated run skips recompiling (override with
    JAX_COMPILATION_CACHE_DIR)."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))


class StopOnSignal:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 0. A second one aborts at once."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            # Abort at once, wherever the main thread is (even inside a checkpoint's commit): an
            # unfinished save is never the latest (orbax renames a finished one into place).
            os.write(2, f"tessera: interrupted by a second {name}; the newest complete checkpoint is kept\n".encode())
            os._exit(130)
        self.received = name
        # os.write, not print: a handler that interrupts a print to stderr may not print itself.
        os.write(2, f"tessera: {name} received: finishing this step and saving a checkpoint "
                    "(send it again to abort at once)\n".encode())

    def __call__(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def run_train(path: str | None, overrides: list[str], force: bool = False, command: str = "train") -> int:
    """`tessera train` and `tessera distill` (a config with a distill section): one training loop."""
    cfg = load_config(path, overrides)  # validated before jax starts compiling anything
    check_command(cfg, command)

    from infra.devices import UnknownDevice
    from infra.distributed import agreed, start_from_env
    from infra.mesh import build_mesh, logical_rules
    from train.loop import train
    import jax

    start_from_env()  # joins a multi-process job when the environment describes one
    enable_compilation_cache()
    rules = logical_rules(cfg)
    mesh = build_mesh(cfg)
    from infra.targets import local_target

    try:
        # A quantized matmul's peak is another number than the compute dtype's: no MFU rather than a wrong one.
        peak = None if cfg.model.qat is not None else local_target().peak(cfg.model.dtype)
    except UnknownDevice as e:
        logging.getLogger(__name__).warning("%s; mfu is not reported", e)
        peak = None
    stop = StopOnSignal()
    try:
        result = train(cfg, mesh, rules, force=force, stop_requested=agreed(stop), peak_flops_per_device=peak)
    finally:
        stop.restore()
    if jax.process_index() != 0:  # the job's summary is printed once
        return 0
    if "stopped_at" in result:
        print(f"stopped by {stop.received or 'a signal to another process'} at step {result['stopped_at']}; checkpoint saved in "
              f"{result['run_dir']}/checkpoints; run `tessera train {result['run_dir']}` to resume")
        return 0
    if "eval_bits_per_byte" in result:
        bpb, base = result["eval_bits_per_byte"], result["unigram_bits_per_byte"]
        print(
            f"final held-out: loss {result['eval_loss']:.4f} nats/token, perplexity {result['eval_perplexity']:.3f}, "
            f"bits per byte {bpb:.4f} (unigram baseline {base:.4f}, {100 * (1 - bpb / base):.1f}% better) "
            f"-> {result['run_dir']}"
        )
    return 0


def check_command(cfg, command: str) -> None:
    from train.config import ConfigError

    if command == "distill" and cfg.distill is None:
        raise ConfigError("tessera distill needs a distill section: at least distill.teacher=TEACHER_RUN_DIR")
    if command == "train" and cfg.distill is not None:
        raise ConfigError("this config has a distill section (a teacher); run it with `tessera distill`")


def run_dump_teacher_topk(path: str | None, overrides: list[str], k: int, out: str) -> int:
    """Write the teacher's top-K log-probs over the config's training batches (one process)."""
    cfg = load_config(path, overrides)
    check_command(cfg, "distill")
    from infra.mesh import build_mesh, logical_rules
    from train.distill import dump_teacher_topk

    enable_compilation_cache()
    dump_teacher_topk(cfg, build_mesh(cfg), logical_rules(cfg), k, out)
    print(f"train the student from it: tessera distill {path or ''} {' '.join(overrides)} "
          f"distill.teacher_topk={out}".replace("  ", " "))
    return 0


def run_tokenizer_train(path: str | None, overrides: list[str], vocab_size: int, out: str) -> int:
    from train.config import ConfigError
    from train.data import is_heldout, load_documents
    from train.tokenizer import TokenizerError, train_bpe

    cfg = load_config(path, overrides)
    docs, _ = load_documents(cfg.data)
    # Held-out documents stay unseen by the tokenizer too.
    train_docs = [d for d in docs if not is_heldout(d[0], cfg.data.heldout_fraction)]
    try:
        tok = train_bpe((text for _, text in train_docs), vocab_size, out)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {out}: {tok.vocab_size} tokens trained on {len(train_docs)} documents")
    return 0


def open_trained_run(run_dir: str, overrides: list[str]):
    """A run directory's latest checkpoint on a mesh of this machine's devices (`mesh.*` overrides
    choose the layout: inference needs no particular one)."""
    from infra.mesh import build_mesh, logical_rules
    from train.config import ConfigError, with_overrides
    from train.inference import load_trained, run_config

    cfg = run_config(run_dir)
    foreign = [o for o in overrides if not o.startswith("mesh.")]
    if foreign:
        raise ConfigError(f"only mesh.* overrides apply to a trained run, got {foreign[0]!r}")
    import jax

    # The training mesh may not fit this machine: default to all devices on the batch axis, with
    # scoring batches a multiple of the device count.
    n = jax.device_count()
    batch = -(-cfg.data.batch_size // n) * n
    cfg = with_overrides(
        cfg, ["mesh.data=-1", "mesh.fsdp=1", "mesh.expert=1", "mesh.tensor=1", f"data.batch_size={batch}",
              "train.microbatches=1", *overrides]
    )
    enable_compilation_cache()
    rules = logical_rules(cfg)
    mesh = build_mesh(cfg)
    return load_trained(run_dir, mesh, rules, cfg), mesh, rules
