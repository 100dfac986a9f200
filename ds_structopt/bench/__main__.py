"""``python -m ds_structopt.bench SUITE`` / ``ds-structopt bench SUITE``.

Suites: ``convergence`` (steps/time to AdamW's final loss), ``step`` (optimizer
and whole training-step time, memory, state bytes at LLaMA shapes), ``dist``
(1/2/4 CPU ranks at ZeRO 1/2/3: state per rank, bytes communicated, step time
vs DeepSpeed's AdamW), ``refresh`` (step-time spikes of basis refreshes: synchronous,
staggered, staggered + refresh-ahead, 2 and 4 ranks), ``regime`` (the convergence suite at the
papers' ratios of tokens per step, tokens and refreshes per run, several seeds, bracketed lrs,
resumable), ``scale`` (our distributed step as sampled ranks of 8-1024-GPU worlds, simulated with
fake CUDA tensors and a fake process group: host syncs, Python time, live bytes, messages, load
balance, next to the planner; resumable). Each writes ``<suite>.json``, ``<suite>.md`` and PNGs to
``--out``; ``--quick`` is the CI smoke size (each suite under 5 minutes here).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

SUITES = ("convergence", "regime", "step", "dist", "refresh", "scale")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from . import convergence, dist, refresh, regime, scale, step

    p = argparse.ArgumentParser(prog="ds-structopt bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="suite", required=True)
    for name, module in (("convergence", convergence), ("regime", regime), ("step", step), ("dist", dist),
                         ("refresh", refresh), ("scale", scale)):
        sp = sub.add_parser(name, help=module.__doc__.splitlines()[0])
        sp.add_argument("--out", default=f"runs/bench/{name}", help="output folder (regime: a rerun skips its finished runs)")
        sp.add_argument("--quick", action="store_true", help="CI smoke size")
        sp.add_argument("--optimizers", nargs="+", default=None, help="subset (default: all of the suite's)")
        module.add_arguments(sp)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    try:
        if args.suite == "convergence":
            from . import convergence, optimizers

            result = convergence.run(convergence.settings_from(args, args.quick), optimizers.names(args.optimizers),
                                     args.out, baseline=args.baseline)
        elif args.suite == "regime":
            from . import regime

            result = regime.run_cli(args)
        elif args.suite == "step":
            from . import step

            result = step.run_cli(args)
        elif args.suite == "refresh":
            from . import refresh

            result = refresh.run_cli(args)
        elif args.suite == "scale":
            from . import scale

            result = scale.run_cli(args)
        else:
            from . import dist

            result = dist.run_cli(args)
    except ValueError as exc:  # bad names or sizes: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(open(result["files"]["markdown"]).read())
    print("wrote", ", ".join(list(result["files"].values()) + list(result.get("plots", []))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
