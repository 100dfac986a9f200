"""``ds-structopt plan``: print what a configuration costs per rank, for one or many world sizes.

Example: ``ds-structopt plan --model 7b 13b 70b --world 8 64 256 1024 --ranks-per-node 8 --stage 2
--optimizer AdaDiag++ --options '{"update_freq": 200, "stagger_refresh": true}'``. With
``--deepspeed-config ds.json`` the optimizer, its options, the stage and the ``ds_structopt``
block come from that file.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..tables import markdown_table
from .model_shapes import model_params
from .planner import make_plan, projection
from .step_memory import sampled_peaks


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds-structopt plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["7b", "13b", "70b"], help="configs/models names or .json paths")
    p.add_argument("--world", nargs="+", type=int, default=[8, 64, 256, 1024], help="data-parallel ranks")
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--optimizer", default="AdaDiag++")
    p.add_argument("--options", default="{}", help="optimizer params as JSON")
    p.add_argument("--deepspeed-config", help="take optimizer, options, stage and ds_structopt block from this JSON")
    p.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"],
                   help="zero_optimization.offload_optimizer.device: adds host (cpu) or NVMe (nvme) GiB per node")
    p.set_defaults(param_bytes=2)  # bytes per model parameter (bf16); a --deepspeed-config sets it from its precision
    p.add_argument("--ownership", default="local", choices=["local", "balanced"])
    p.add_argument("--cost-model", default="flops", choices=["flops", "memory", "numel"])
    p.add_argument("--ownership-group-size", type=int, default=None,
                   help="hierarchical ownership: owners per group of this many ranks (e.g. ranks per node)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--tokens-per-step", type=int, default=4 * 1024 * 1024, help="global batch in tokens")
    p.add_argument("--device-tflops", type=float, default=989.0, help="dense bf16 peak per device (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of that peak the model's training reaches")
    p.add_argument("--matmul-tflops", type=float, default=50.0, help="our fp32 rotation matmuls, achieved")
    p.add_argument("--decomp-tflops", type=float, default=1.5,
                   help="fp32 eigh/SVD achieved (latency-bound: far below peak)")
    p.add_argument("--intra-node-gbps", type=float, default=450.0, help="GB/s per rank within a node (NVLink)")
    p.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per rank across nodes (400 Gb/s NIC)")
    p.add_argument("--json", help="also write every plan and projection to this file")
    return p.parse_args(argv)


def _from_deepspeed(args: argparse.Namespace) -> None:
    from ..integrations.deepspeed_config import offload_device, parse_config

    parsed = parse_config(args.deepspeed_config)
    raw = parsed.ds_config
    if parsed.optimizer_cls is None:
        raise ValueError(f"{args.deepspeed_config}: optimizer.type {parsed.optimizer_type!r} is not a ds_structopt optimizer")
    args.optimizer, args.options = parsed.optimizer_type, json.dumps(parsed.options)
    args.stage = int((raw.get("zero_optimization") or {}).get("stage", 0))
    args.offload = offload_device(raw.get("zero_optimization") or {})
    args.param_bytes = 2 if any((raw.get(k) or {}).get("enabled") for k in ("bf16", "fp16")) else 4
    args.ownership = parsed.dist_options.ownership
    args.cost_model = parsed.dist_options.cost_model
    args.ownership_group_size = parsed.dist_options.ownership_group_size or args.ownership_group_size


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.deepspeed_config:
            _from_deepspeed(args)
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError(f"--options must be a JSON object, got {args.options!r}")
        rows, dumps = [], []
        for model in args.model:
            groups = model_params(model, args.optimizer, options, seq_len=args.seq_len)
            for world in args.world:
                plan = make_plan(groups, args.optimizer, options, world, args.stage, args.ranks_per_node,
                                 args.ownership_group_size, args.ownership, args.cost_model, args.offload,
                                 args.param_bytes)
                proj = projection(plan, args.tokens_per_step, args.device_tflops * 1e12, args.mfu,
                                  args.matmul_tflops * 1e12, args.decomp_tflops * 1e12,
                                  args.intra_node_gbps * 1e9, args.inter_node_gbps * 1e9)
                peaks = sampled_peaks(plan, groups, options)
                peak = max(p.peak for p in peaks.values())
                rows.append([model, world, f"{plan.params / 1e9:.2f}B", max(plan.state_bytes_per_rank) / 2**30, peak / 2**30,
                             plan.refresh_max / 1e12, plan.refresh_mean / 1e12,
                             plan.our_bytes_per_step / world / 2**30, plan.deepspeed_bytes_per_step / world / 2**30,
                             proj["adamw_step_s"], f"{proj['overhead_mean']:.1%}", f"{proj['overhead_worst_step']:.1%}"]
                            + ([max(plan.host_bytes_per_node or plan.nvme_bytes_per_node) / 2**30]
                               if args.offload != "none" else []))
                dumps.append({"model": model, **plan.as_dict(), "projection": proj,
                              "peak_bytes_sampled": {r: p.per_step for r, p in peaks.items()}})
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # under offload the state is streamed through the GPU (or stays on the host): the GPU peak
    # projected is the one without offload, an upper bound (planning/step_memory.py does not model streaming)
    peak_header = "step peak GiB/rank (max of sampled)" if args.offload == "none" else \
        "GPU step peak GiB/rank without offload (bound)"
    headers = ["model", "ranks", "params", "state GiB/rank (max)", peak_header, "refresh TFLOP/step max", "refresh TFLOP/step mean",
               "our GiB/step/rank", "DeepSpeed GiB/step/rank", "AdamW step s", "overhead (mean)", "overhead (worst step)"] + (
        [{"cpu": "host GiB/node (cpu offload)", "nvme": "NVMe GiB/node (nvme offload)"}[args.offload]]
        if args.offload != "none" else [])
    print(f"{args.optimizer} {args.options}, ZeRO-{args.stage}, {args.ranks_per_node} ranks/node, "
          f"ownership {args.ownership} by {args.cost_model}" + (f" in groups of {args.ownership_group_size}" if args.ownership_group_size else "")
          + f"; {args.tokens_per_step} tokens/step, model at {args.device_tflops:g} TFLOP/s x MFU {args.mfu:g}, "
          f"rotations {args.matmul_tflops:g} TFLOP/s, eigh/SVD {args.decomp_tflops:g} TFLOP/s, "
          f"{args.intra_node_gbps:g}/{args.inter_node_gbps:g} GB/s intra/inter-node\n")
    print(markdown_table(headers, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dumps, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
