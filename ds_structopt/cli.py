"""``ds-structopt`` console script: ``train`` (the LLaMA entry point), ``validate`` (check a DeepSpeed JSON),
``check`` (is this environment able to train: versions, DeepSpeed accelerator, optimizers), ``bench``
(benchmark suites, docs/benchmarks.md), ``plan`` (what a run costs per rank at scale), ``export``
(a checkpoint's fp32 weights as one state dict)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "train a LLaMA model (see: ds-structopt train --help)",
                "validate": "check a DeepSpeed JSON with a ds_structopt optimizer block",
                "check": "check this environment: pinned versions, DeepSpeed accelerator, optimizers",
                "bench": "benchmarks vs AdamW and peers: convergence, step, dist (see: ds-structopt bench --help)",
                "plan": "per-rank state memory, refresh load and bytes/step for a model at scale (no GPU needed)",
                "export": "fp32 weights by name from a checkpoint folder: ds-structopt export <ckpt/tag> <out.pt>",
                "prepare-data": "tokenize sources once into a folder training memory-maps (--data <folder>)"}
    if not args or args[0] not in commands:
        print("usage: ds-structopt {train,validate,check,bench,plan,export,prepare-data} ...\n"
              + "\n".join(f"  {k:12s} {v}" for k, v in commands.items()),
              file=sys.stderr)
        return 2
    if args[0] == "train":
        from .train import main as train_main

        train_main(args[1:])
        return 0
    if args[0] == "bench":
        from .bench.__main__ import main as bench_main

        return bench_main(args[1:])
    if args[0] == "plan":
        from .planning.cli import main as plan_main

        return plan_main(args[1:])
    if args[0] == "export":
        return _export(args[1:])
    if args[0] == "prepare-data":
        from .data.prepare_cli import main as prepare_main

        return prepare_main(args[1:])
    if args[0] == "check":
        from .healthcheck import main as check_main

        return check_main(args[1:])
    from .integrations.deepspeed_config import main as validate_main

    return validate_main(args[1:])


def _export(args: list[str]) -> int:
    """``export <checkpoint folder> <out.pt|out.safetensors>``: one file, loadable without ds_structopt."""
    if len(args) != 2:
        print("usage: ds-structopt export <checkpoints/stepNNNNNNNN> <out.pt|out.safetensors>", file=sys.stderr)
        return 2
    from .checkpoint import consolidated

    try:
        weights = consolidated(args[0])
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args[1].endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(weights, args[1])
    else:
        import torch

        torch.save(weights, args[1])
    print(f"wrote {len(weights)} tensors ({sum(t.numel() for t in weights.values()) / 1e6:.1f} M parameters, fp32) to {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
