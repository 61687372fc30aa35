"""`tessera sample RUN_DIR`: complete prompts with a trained checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from infra.commands.arguments import add_trained_run_arguments
from train.config import ConfigError

DEFAULT_MAX_NEW_TOKENS = 64


def read_schema(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text()
        json.loads(text)
    except OSError as e:
        raise ConfigError(f"--json-schema {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"--json-schema {path} is not valid JSON: {e}") from None
    return text


def run(args) -> int:
    from infra.runtime import open_trained_run
    from train.generation import Generator, SamplingOptions, check_request
    from train.inference import run_config
    from train.response_cache import ResponseCache, complete_cached
    from train.tokenizer import load_tokenizer

    cfg = run_config(args.run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    max_new = args.max_new_tokens
    if max_new is None:  # as many as fit in the context after the longest prompt, up to the default
        longest = max((len(tokenizer.encode(p)) for p in args.prompt), default=0)
        if longest >= cfg.model.max_seq_len:
            raise ConfigError(f"a prompt is {longest} tokens, which fills the model's context of "
                              f"{cfg.model.max_seq_len} tokens and leaves no room to generate; shorten it")
        max_new = min(DEFAULT_MAX_NEW_TOKENS, cfg.model.max_seq_len - longest)
    opts = SamplingOptions(
        max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, num_samples=args.num_samples, stop=tuple(args.stop), beam=args.beam,
        length_penalty=args.length_penalty, best_of=args.best_of, regex=args.regex,
        json_schema=read_schema(args.json_schema), chat=args.chat,
    )
    check_request(cfg.model, tokenizer, args.prompt, opts)  # every refusal comes before loading weights
    if args.reward_model and not args.best_of:
        raise ConfigError("--reward-model ranks the candidates of --best-of N; add --best-of")
    if args.reward_model and not run_config(args.reward_model).model.score_head:
        raise ConfigError(f"--reward-model {args.reward_model} is not a reward model (no score head); train one with "
                          "train.objective=reward")
    run, mesh, rules = open_trained_run(args.run_dir, args.overrides)
    generator = Generator(run.cfg.model, run.model.graphdef, run.params, run.tokenizer, mesh, rules)
    score = None
    if args.reward_model:
        from train.reward_model import RewardScorer

        rm, rm_mesh, rm_rules = open_trained_run(args.reward_model, args.overrides)
        score = RewardScorer(rm, rm_mesh, rm_rules, chat=args.chat)
    cache = ResponseCache(args.cache) if args.cache else None  # a reward model's ranking bypasses it
    results = complete_cached(generator, run.checkpoint_id, args.prompt, opts, cache, score)
    if args.json:
        print(json.dumps([
            {"prompt": p, "completions": [{**asdict(c), "mean_logprob": c.mean_logprob} for c in cs]}
            for p, cs in zip(args.prompt, results, strict=True)
        ]))
        return 0
    for i, (prompt, completions) in enumerate(zip(args.prompt, results, strict=True)):
        for j, c in enumerate(completions):
            score = "" if c.score is None else f", score {c.score:.4f}"
            print(f"--- prompt {i}, completion {j} ({c.finish_reason}, {len(c.tokens)} tokens, "
                  f"log p {c.logprob:.2f}{score})")
            print(prompt + c.text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="complete prompts with a trained run's latest checkpoint",
        description="Prefill each prompt, then decode with a KV cache in one compiled loop. Sampling order: "
        "temperature, top-k, top-p. The same --seed gives the same output. OVERRIDES may set mesh.* only.",
    )
    add_trained_run_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="text to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"default: {DEFAULT_MAX_NEW_TOKENS}, or what fits in the model's context after the prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this much probability (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--beam", type=int, default=0, help="beam search of this width instead of sampling")
    p.add_argument("--length-penalty", type=float, default=0.0, help="beam score = log p / length**this")
    p.add_argument("--best-of", type=int, default=0, help="sample N per prompt, keep the best by mean log-probability "
                   "(or by --reward-model)")
    p.add_argument("--reward-model", help="a reward model's run directory: --best-of keeps the candidate it scores "
                   "highest")
    p.add_argument("--chat", action="store_true", help="each prompt is a user message in the run's chat template")
    p.add_argument("--regex", help="every completion fully matches this regular expression")
    p.add_argument("--json-schema", help="every completion is a JSON document valid under this schema file")
    p.add_argument("--cache", help="directory of a response cache: repeated requests are answered from it")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
