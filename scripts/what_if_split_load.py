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
from ds_structopt.planning.model_shapes import model_params

WORLDS = (64, 128, 256)


def matrices(family: type[StructuredOptimizer], options: dict[str, Any], parts: int,
             model: str = "70b") -> list[MatrixInfo]:
    """The model's preconditioned matrices as the planner sees them (``model_params``), each whole,
    or, where one side is longer than ``max_precond_dim`` (never rotated), cut into ``parts``
    along that side."""
    out = []
    specs = [p for group in model_params(model, family.NAME, options) for p in group if p.is_matrix]
    for spec in specs:
        m, n = spec.rows_cols
        if parts == 1 or max(m, n) <= options["max_precond_dim"]:
            out.append(MatrixInfo.of(spec.name, m, n, family, options))
            continue
        pm, pn = (m // parts, n) if m >= n else (m, n // parts)
        refresh = family.refresh_flops(m, n, options) / max(1, int(options.get("update_freq", 1)))
        out += [MatrixInfo(f"{spec.name}#{p}", pm, pn, family.step_flops(pm, pn, options) + refresh, 0)
                for p in range(parts)]
    return out


def max_over_mean(infos: list[MatrixInfo], world: int) -> float:
    """The planner's flat placement of ``infos`` on ``world`` ranks: most loaded rank over the mean."""
    load = loads(infos, plan_owners(infos, world), world)
    return max(load) / (sum(load) / world)


# (family, options beyond its defaults, parts per MLP matrix): the rows of docs/benchmarks.md's table
CASES = (("AdaDiag++", {}, 1), ("AdaDiag++", {}, 2), ("AdaDiag++", {}, 4), ("ASGO", {}, 1),
         ("ASGO", {"root": "eigh"}, 1), ("DASGO", {}, 1), ("DASGO", {}, 2), ("DASGO", {}, 4))


def projection(family_name: str, extra: dict[str, Any], parts: int) -> dict[int, float]:
    """World size -> max/mean load (3 decimals) of one case."""
    family = get_optimizer_class(family_name)
    options = family.resolve_options(dict(extra))
    infos = matrices(family, options, parts)
    return {w: round(max_over_mean(infos, w), 3) for w in WORLDS}


def main() -> None:
    for family_name, extra, parts in CASES:
        print(f"{family_name} {extra or ''} MLP in {parts} part(s): max/mean {projection(family_name, extra, parts)}")


if __name__ == "__main__":
    main()
