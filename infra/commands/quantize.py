"""`tessera quantize RUN_DIR --method ... --out DIR`: weight-only post-training quantization, with a report."""

from __future__ import annotations

import json

from infra.commands.arguments import add_trained_run_arguments
from train import storage
from train.config import ConfigError

METHODS = ("int8-weight-only", "int4-weight-only")
DEFAULT_INT4_GROUP = 32  # per-channel int4 loses too much; groups of 32 rows are the usual choice


def parse_layers(text: str) -> tuple[str, ...]:
    from model.config import QUANT_ROLES
    from train.quantize import NOT_QUANTIZABLE

    layers = tuple(part.strip() for part in text.split(",") if part.strip())
    for layer in layers:
        if layer in NOT_QUANTIZABLE:
            raise ConfigError(f"--layers {layer}: not quantizable: {NOT_QUANTIZABLE[layer]}; quantizable layers: "
                              f"{', '.join(QUANT_ROLES)}")
        if layer not in QUANT_ROLES:
            raise ConfigError(f"--layers {layer}: unknown layer kind; quantizable layers: {', '.join(QUANT_ROLES)}")
    if not layers:
        raise ConfigError(f"--layers is empty; name some of: {', '.join(QUANT_ROLES)}")
    return layers


def run(args) -> int:
    from model.config import WeightQuantConfig
    from infra.runtime import open_trained_run
    from train.inference import run_config
    from train.quantize import check_request, quantize_report, save_report, write_quantized

    if args.method not in METHODS:
        raise ConfigError(f"--method {args.method!r} is not a quantization method; choose one of {', '.join(METHODS)}")
    group = args.group_size if args.group_size is not None else (DEFAULT_INT4_GROUP if args.method.startswith("int4") else 0)
    if group < 0:
        raise ConfigError(f"--group-size must be positive (or 0 for per-channel scales), got {group}")
    wq = WeightQuantConfig(method=args.method, group_size=group or None, layers=parse_layers(args.layers))
    out = storage.local_only(args.out, "--out")
    names = check_request(run_config(args.run_dir), out, wq)  # every refusal before any weights load
    run, mesh, rules = open_trained_run(args.run_dir, args.overrides)
    cfg, params = write_quantized(run, out, wq, mesh, rules)
    report = {"source": str(run.run_dir), "out": str(out), "weights": len(names),
              **quantize_report(run, cfg, params, mesh, rules, new_tokens=args.decode_tokens)}
    save_report(out, report)
    if args.json:
        print(json.dumps(report))
        return 0
    b0, b1 = report["param_bytes_before"], report["param_bytes_after"]
    print(f"quantized {len(names)} weights of {run.run_dir} (step {run.step}) with {wq.method}"
          f"{f', groups of {wq.group_size}' if wq.group_size else ', per-channel scales'} -> {out}")
    print(f"  parameter bytes  {b0:>12,} -> {b1:>12,}  ({b1 / b0:.3f}x)")
    print(f"  held-out bits/byte {report['bits_per_byte_before']:.4f} -> {report['bits_per_byte_after']:.4f}  "
          f"({report['bits_per_byte_after'] - report['bits_per_byte_before']:+.4f})")
    print(f"  greedy decode tokens/s {report['decode_tokens_per_sec_before']:.1f} -> "
          f"{report['decode_tokens_per_sec_after']:.1f} (this machine)")
    print(f"  report: {out / 'quantize_report.json'}; sample with `tessera sample {out} --prompt ...`")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="weight-only post-training quantization of a trained run (int8 / int4), with a quality and speed report",
        description="Quantizes the matmul weights of RUN_DIR's latest checkpoint (qwix) into a new run directory "
        "that `tessera sample` and `tessera eval` load like any run, and reports parameter bytes, held-out bits "
        "per byte and greedy decode tokens/s before and after (also in OUT/quantize_report.json).",
    )
    add_trained_run_arguments(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="the new run directory for the quantized model")
    p.add_argument("--group-size", type=int,
                   help=f"rows per scale along each weight's input; 0: one scale per output channel "
                        f"(default: per-channel for int8, {DEFAULT_INT4_GROUP} for int4)")
    p.add_argument("--layers", default="attention,mlp,experts",
                   help="comma-separated layer kinds to quantize: attention, mlp, experts, lm_head")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens per prompt for the speed figure")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
