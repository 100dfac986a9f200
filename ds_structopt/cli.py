"""``ds-structopt`` console script: ``train`` (the LLaMA entry point), ``validate`` (check a DeepSpeed JSON),
``check`` (is this environment able to train: versions, DeepSpeed accelerator, optimizers), ``bench``
(benchmark suites, docs/benchmarks.md), ``plan`` (what a run costs per rank at scale)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "train a LLaMA model (see: ds-structopt train --help)",
                "validate": "check a DeepSpeed JSON with a ds_structopt optimizer block",
                "check": "check this environment: pinned versions, DeepSpeed accelerator, optimizers",
                "bench": "benchmarks vs AdamW and peers: convergence, step, dist (see: ds-structopt bench --help)",
                "plan": "per-rank state memory, refresh load and bytes/step for a model at scale (no GPU needed)"}
    if not args or args[0] not in commands:
        print("usage: ds-structopt {train,validate,check,bench,plan} ...\n" + "\n".join(f"  {k:9s} {v}" for k, v in commands.items()),
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
    if args[0] == "check":
        from .healthcheck import main as check_main

        return check_main(args[1:])
    from .integrations.deepspeed_config import main as validate_main

    return validate_main(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
