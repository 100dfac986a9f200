"""What splitting one-sided matrices would do to flat ownership's load at 70B (issue 18).

Whole-matrix placement cannot bring max/mean load under 1.19 for AdaDiag++ at 256 ranks (70B): 400
large matrices on 256 ranks put two on 144 ranks. The split that would fix it is not built; this
projects it with the families' own cost functions and the real planner (``plan_owners``), so the
next step has a measured target: the 70B MLP matrices rotate only their 8192 side
(``max_precond_dim``), so their 28672 side can be cut into ``k`` parts, each paying its share of
the step and the whole amortized refresh (every part decomposes the same gathered gradient).

    .venv/bin/python scripts/what_if_split_load.py
"""
from __future__ import annotations

from typing import Any

from ds_structopt.distributed.ownership import MatrixInfo, loads, plan_owners
from ds_structopt.optim.base import StructuredOptimizer
from ds_structopt.optim.registry import get_optimizer_class

WORLDS = (64, 128, 256)
LONG = 28672  # the 70B MLP's long side: never rotated at max_precond_dim 10000


def shapes_70b() -> list[tuple[str, int, int]]:
    """(name, rows, cols) of LLaMA-2 70B's structured matrices (80 layers, GQA k/v of 1024)."""
    per_layer = (("q", 8192, 8192), ("k", 1024, 8192), ("v", 1024, 8192), ("o", 8192, 8192),
                 ("gate", LONG, 8192), ("up", LONG, 8192), ("down", 8192, LONG))
    return [(f"{layer}.{name}", m, n) for layer in range(80) for name, m, n in per_layer]


def matrices(family: type[StructuredOptimizer], options: dict[str, Any], parts: int) -> list[MatrixInfo]:
    """Each matrix whole, or an MLP matrix as ``parts`` cuts of its long side."""
    out = []
    for name, m, n in shapes_70b():
        if parts == 1 or LONG not in (m, n):
            out.append(MatrixInfo.of(name, m, n, family, options))
            continue
        pm, pn = (m // parts, n) if m == LONG else (m, n // parts)
        refresh = family.refresh_flops(m, n, options) / max(1, int(options.get("update_freq", 1)))
        out += [MatrixInfo(f"{name}#{p}", pm, pn, family.step_flops(pm, pn, options) + refresh, 0) for p in range(parts)]
    return out


def max_over_mean(infos: list[MatrixInfo], world: int) -> float:
    """The planner's flat placement of ``infos`` on ``world`` ranks: most loaded rank over the mean."""
    load = loads(infos, plan_owners(infos, world), world)
    return max(load) / (sum(load) / world)


def main() -> None:
    for family_name, extra, parts in (("AdaDiag++", {}, 1), ("AdaDiag++", {}, 2), ("AdaDiag++", {}, 4),
                                       ("ASGO", {}, 1), ("ASGO", {"root": "eigh"}, 1), ("DASGO", {}, 1), ("DASGO", {}, 2), ("DASGO", {}, 4)):
        family = get_optimizer_class(family_name)
        options = {**family.DEFAULTS, **extra}
        ratios = {w: round(max_over_mean(matrices(family, options, parts), w), 3) for w in WORLDS}
        print(f"{family_name} {extra or ''} MLP in {parts} part(s): max/mean {ratios}")


if __name__ == "__main__":
    main()
