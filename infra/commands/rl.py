"""`tessera rl [CONFIG | RUN_DIR] [overrides]`: reinforcement learning from rewards (GRPO or PPO)."""

from __future__ import annotations

from infra.commands.arguments import add_run_arguments, split_config_arg
from infra.commands.train import run_training
from train.recipes import load_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "rl",
        help="reinforcement learning from rewards: GRPO or PPO on the policy's own samples",
        description="Each step samples rl.group_size completions for data.batch_size prompts (rl.prompts: a JSONL "
        "file or synth:TASKS) with the current policy, scores them (rl.rewards: regex:P, count:TEXT, length:N, "
        "eos, answer, similarity, rm:RUN, an entry point or module:function, each optionally W*), and makes "
        "rl.epochs x rl.minibatches clipped policy-gradient updates. rl.algorithm=grpo normalises rewards within "
        "each group; "
        "ppo trains a value model and uses GAE. Start from a run with train.init_from=RUN. Runs, resumes, stops "
        "and launches exactly like `tessera train`; exit 3 when training diverges or more than "
        "rl.max_reward_error_rate of the groups fail their rewards.",
    )
    add_run_arguments(p, "experiment YAML with an rl section (configs/experiments/grpo.yaml), or an RL run directory")
    p.set_defaults(func=run)


def run(args) -> int:
    path, overrides = split_config_arg(args)
    return run_training(load_config(path, overrides), force=args.force, command="rl")
