"""Scale suite: our real distributed step as sampled ranks of 8-1024-GPU worlds, on one CPU.

Each configuration (world size, LLaMA 7B/70B shapes, ZeRO stage, flat or node-level
ownership, optimizer) runs ``DistributedStructuredOptimizer`` as a few ranks of the world,
one after another in this process (``ds_structopt.sim``: torch's fake CUDA tensors and
fake process group; DeepSpeed's own ZeRO partition functions lay the parameters out).
Fake tensors make the math free, so what is measured is what the step costs besides
the math, per simulated rank:

- host-device synchronisations per step (reads of a CUDA tensor's value);
- Python time per step: wall time minus the time inside torch calls (fake-tensor dispatch
  and the simulation's modes, which a GPU does not run), and the number of torch calls
  (what a GPU would launch);
- peak bytes of our optimizer (its state plus what the step allocates on top of what was
  alive when it began: ``peak_bytes``), the transient part alone, and the whole simulated
  rank's peak (bf16 parameters, DeepSpeed's fp32 partitions and gradient partitions too);
- bytes and messages our step sends, and to how many peers;
- compute load: the family's own FLOPs of what each rank owns, max/mean over all ranks
  (from the ownership plan every rank computes);

next to the planner's projection of the same configuration. Steps: 1 (first bases,
synchronous), 2-4 plain, 5 a refresh (``update_freq=4``). Results are cached per
configuration in ``<out>/scale.json``: a rerun skips finished ones (a sweep may span
several invocations).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..tables import markdown_table

WORLDS = (8, 64, 256, 1024)
MODELS = ("7b", "70b")
STAGES = (1, 2, 3)
OWNERSHIP = ("flat", "node")
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "AdaDiag++": ("AdaDiag++", {}),
    "AdaDiag++ factored": ("AdaDiag++", {"factored": True}),
    "ASGO": ("ASGO", {}),
    "DASGO": ("DASGO", {}),
}
STEPS = 5
UPDATE_FREQ = 4
PLAIN_STEPS = (2, 3, 4)
REFRESH_STEP = 5
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Config:
    ranks: int
    model: str
    stage: int
    ownership: str   # "flat": one owner per matrix in the world; "node": one per 8-rank node
    optimizer: str   # a VARIANTS key
    layers: Optional[int] = None  # None: the model's own depth

    @property
    def key(self) -> str:
        depth = "" if self.layers is None else f"/{self.layers}L"
        return f"{self.ranks}/{self.model}{depth}/zero{self.stage}/{self.ownership}/{self.optimizer}"


def configs(worlds: tuple[int, ...], models: tuple[str, ...], stages: tuple[int, ...], ownership: tuple[str, ...],
            optimizers: tuple[str, ...], layers: Optional[int] = None) -> list[Config]:
    return [Config(n, m, s, o, opt, layers) for m, n, s, o, opt in
            itertools.product(models, worlds, stages, ownership, optimizers)]


def sampled_ranks(world: int, owners_load: list[float]) -> list[int]:
    """Rank 0, the last rank, and the rank with the most owned work."""
    heaviest = max(range(world), key=lambda r: (owners_load[r], -r))
    return sorted({0, world - 1, heaviest})


def run_config(cfg: Config) -> list[dict[str, Any]]:
    """One row per sampled rank of ``cfg``."""
    first = simulate(cfg, 0)
    rows = [first]
    for rank in sampled_ranks(cfg.ranks, first.pop("_loads")):
        if rank != 0:
            row = simulate(cfg, rank)
            row.pop("_loads")
            rows.append(row)
    return rows


def simulate(cfg: Config, rank: int) -> dict[str, Any]:
    """Steps 1-5 of rank ``rank`` of ``cfg``'s world; its row of the table."""
    from ..distributed.optimizer import DistributedStructuredOptimizer
    from ..distributed.options import DistributedOptions
    from ..optim.registry import get_optimizer_class
    from ..sim.world import Replicated, Zero3, Zero12, holders_oracle, llama_param_groups, rank_device, simulated_rank

    family, extra = VARIANTS[cfg.optimizer]
    cls = get_optimizer_class(family)
    options = bench_options(cls, extra)
    group_size = GPUS_PER_NODE if cfg.ownership == "node" else None
    answer: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []
    with simulated_rank(rank, cfg.ranks, oracle=lambda obj, r: answer["fn"](obj, r)) as sim:
        device = rank_device(rank, GPUS_PER_NODE)
        if cfg.stage == 3:
            groups = llama_param_groups(cfg.model, cfg.layers, device=device, shape_of=lambda s: (0,))
            layout: Any = Zero3(groups, cfg.ranks, rank, device, sub_group_size=int(1e9))
        elif cfg.stage in (1, 2):
            groups = llama_param_groups(cfg.model, cfg.layers, device=device)
            layout = Zero12(groups, cfg.ranks, rank, device)
        else:
            groups = llama_param_groups(cfg.model, cfg.layers, device=device)
            layout = Replicated(groups, cfg.ranks, rank)
        bias = sim.torch_time.calibrate()
        answer["fn"] = holders_oracle(layout)
        opt = DistributedStructuredOptimizer(groups, cls, options,
                                             dist_options=DistributedOptions(ownership_group_size=group_size))
        if hasattr(layout, "attach"):
            layout.attach(opt)
        for step in range(1, STEPS + 1):
            layout.fill_grads()
            syncs, calls, sent = sim.syncs.count, len(sim.checker.calls), opt.comm_bytes
            sites = dict(sim.syncs.sites)
            live, state_before = sim.memory.reset_peak(), opt.state_bytes()
            in_torch, ops = sim.torch_time.seconds, sim.torch_time.calls
            gc.collect()  # the simulator's own garbage (fake tensors, finalizers) is not ours to time
            gc.disable()
            start = time.perf_counter()
            try:
                layout.step(opt)
            finally:
                seconds = time.perf_counter() - start
                gc.enable()
            in_torch, ops = sim.torch_time.seconds - in_torch, sim.torch_time.calls - ops
            mine = sim.checker.calls[calls:]
            peers: dict[int, int] = {}
            for c in mine:
                if c.kind == "send":
                    peers[c.peer] = peers.get(c.peer, 0) + c.numel * _width(c.dtype)
            steps.append({"syncs": sim.syncs.count - syncs, "ms": 1e3 * (seconds - in_torch - ops * bias),
                          "wall_ms": 1e3 * seconds,
                          "torch_calls": ops, "live": live, "ours": sim.memory.peak - live + state_before,
                          "sites": {k: v - sites.get(k, 0) for k, v in sim.syncs.sites.items() if v > sites.get(k, 0)},
                          "peak": sim.memory.peak, "sent": opt.comm_bytes - sent,
                          "received": sum(c.numel * _width(c.dtype) for c in mine if c.kind == "recv"),
                          "messages": sum(1 for c in mine if c.kind == "send"),
                          "peers": len(peers), "max_per_peer": max(peers.values(), default=0)})
            for g in groups:  # DeepSpeed frees each partition's gradient after the step
                for p in g["params"]:
                    p.grad = None
        state = opt.state_bytes()
        loads = _loads(opt, cfg.ranks)
        problems = sim.checker.problems + sim.cuda.problems
        del opt, layout, groups
    plain = [steps[s - 1] for s in PLAIN_STEPS]
    mean = sum(loads) / len(loads)
    projected = planned(cfg)
    projected_peaks = planned_peaks(cfg, rank)
    return {
        "config": cfg.key, **asdict(cfg), "rank": rank,
        "host_syncs_per_step": max(s["syncs"] for s in plain),
        "host_sync_sites": {**steps[REFRESH_STEP - 1]["sites"], **plain[-1]["sites"]},
        "host_syncs_first_step": steps[0]["syncs"], "host_syncs_refresh_step": steps[REFRESH_STEP - 1]["syncs"],
        "python_ms_per_step": statistics.median(s["ms"] for s in plain),
        "simulated_wall_ms_per_step": statistics.median(s["wall_ms"] for s in plain),
        "torch_calls_per_step": plain[-1]["torch_calls"],
        "python_ms_refresh_step": steps[REFRESH_STEP - 1]["ms"], "python_ms_first_step": steps[0]["ms"],
        "peak_bytes": max(s["ours"] for s in steps),
        "rank_peak_bytes": max(s["peak"] for s in steps),
        "transient_bytes": max(s["peak"] - s["live"] for s in steps),
        "transient_bytes_plain": max(s["peak"] - s["live"] for s in plain),
        "state_bytes": state,
        "bytes_per_step": plain[-1]["sent"], "received_bytes_per_step": plain[-1]["received"],
        "messages_per_step": plain[-1]["messages"], "peers_per_step": plain[-1]["peers"],
        "max_bytes_per_peer": plain[-1]["max_per_peer"],
        "load_flops": loads[rank], "load_max_over_mean": (max(loads) / mean) if mean else 1.0,
        "planner_state_bytes": projected["plan"].state_bytes_per_rank[rank],
        "peak_bytes_by_step": [s["ours"] for s in steps],
        "planner_peak_bytes": max(projected_peaks), "planner_peak_bytes_by_step": projected_peaks,
        "planner_bytes_per_step": projected["plan"].our_bytes_sent_per_rank[rank],
        "problems": problems[:3],
        "host_cpu": host_cpu(),  # Python ms depend on it (1.7x between two hosts for the same code)
        "_loads": loads,
    }


def host_cpu() -> str:
    """The CPU model of this host (``/proc/cpuinfo``; the platform's name elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bench_options(cls: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The variant's options, with the short refresh period where the family has one."""
    return {**({"update_freq": UPDATE_FREQ} if "update_freq" in cls.DEFAULTS else {}), **extra}


def _width(dtype: str) -> int:
    """Bytes per element of a recorded dtype name ("torch.float32"; "-" for none)."""
    import torch  # the bench module stays importable without torch loaded at import time

    return 0 if dtype == "-" else getattr(torch, dtype.replace("torch.", "")).itemsize


def _loads(opt: Any, world: int) -> list[float]:
    """Per rank, the family's FLOPs per step of the matrices it owns (every replica group)."""
    from ..distributed.ownership import loads

    return loads(opt._infos, opt.replica_owners, world)


_PLANS: dict[str, dict[str, Any]] = {}


def planned(cfg: Config) -> dict[str, Any]:
    """The planner's per-rank figures for ``cfg`` (cached per configuration)."""
    if cfg.key not in _PLANS:
        from ..optim.registry import get_optimizer_class
        from ..planning.model_shapes import model_params
        from ..planning.planner import make_plan

        family, extra = VARIANTS[cfg.optimizer]
        options = bench_options(get_optimizer_class(family), extra)
        model: Any = cfg.model
        if cfg.layers is not None:
            from ..training.models import model_config

            c = model_config(cfg.model, 32000, 256)
            c.num_hidden_layers = cfg.layers
            model = c.to_dict()
        groups = model_params(model, family, options)
        plan = make_plan(groups, family, options, cfg.ranks, min(cfg.stage, 3),
                         ranks_per_node=GPUS_PER_NODE, group_size=GPUS_PER_NODE if cfg.ownership == "node" else None)
        _PLANS[cfg.key] = {"plan": plan, "groups": groups, "options": options}
    return _PLANS[cfg.key]


def planned_peaks(cfg: Config, rank: int) -> list[int]:
    """The planner's projected peak bytes of each of ``rank``'s steps 1-5 (``planning.step_memory``)."""
    from ..optim.registry import get_optimizer_class
    from ..planning.step_memory import rank_step_peaks

    p = planned(cfg)
    plan = p["plan"]
    peaks = rank_step_peaks(p["groups"], get_optimizer_class(VARIANTS[cfg.optimizer][0]), p["options"], cfg.ranks,
                            cfg.stage, rank, plan.replica_owners, plan.group_size, plan.state_bytes_per_rank[rank],
                            steps=range(1, STEPS + 1))
    return [peaks.per_step[s] for s in range(1, STEPS + 1)]


# ----- the sweep -------------------------------------------------------------
def run(todo: list[Config], out: str) -> list[dict[str, Any]]:
    """Simulate every configuration not already in ``<out>/scale.json``; returns all rows."""
    path = Path(out) / "scale.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    done = {r["config"] for r in rows}
    for k, cfg in enumerate(todo, 1):
        if cfg.key in done:
            print(f"[{k}/{len(todo)}] {cfg.key}: cached", flush=True)
            continue
        start = time.perf_counter()
        new = run_config(cfg)
        rows += new
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(path)
        worst = max(new, key=lambda r: r["host_syncs_per_step"])
        print(f"[{k}/{len(todo)}] {cfg.key}: {time.perf_counter() - start:.0f} s, syncs/step "
              f"{worst['host_syncs_per_step']}, python {max(r['python_ms_per_step'] for r in new):.0f} ms, "
              f"load max/mean {new[0]['load_max_over_mean']:.2f}", flush=True)
    write_report(rows, out)
    return rows


def write_report(rows: list[dict[str, Any]], out: str) -> None:
    """``scale.md``: per configuration the worst sampled rank of each figure, and the planner's
    (bytes are per rank, the rank that sends most); ``scale_python_ms.png``, ``scale_peak.png``."""
    lines = ["# Scale: the distributed step as sampled ranks of large worlds (simulated)", "",
             "Worst sampled rank per configuration (ranks 0, N-1 and the most loaded owner). Python = wall time "
             "minus torch's own; peak = our state + what the step allocates (planner: `planning.step_memory`); transient/state: the most loaded "
             "owner's plain step; sent: the rank that sends most; planner = `ds-structopt plan`.", ""]
    table = []
    for key in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == key]
        r0 = rs[0]
        sender = max(rs, key=lambda r: r["bytes_per_step"])
        owner = max(rs, key=lambda r: r["load_flops"])  # the most loaded owner sampled
        table.append([r0["ranks"], r0["model"], r0["stage"], r0["ownership"], r0["optimizer"],
                      max(r["host_syncs_per_step"] for r in rs), max(r["host_syncs_refresh_step"] for r in rs),
                      f"{max(r['python_ms_per_step'] for r in rs):.0f}",
                      _mib(max(r["peak_bytes"] for r in rs)), _mib(max(r["planner_peak_bytes"] for r in rs)),
                      f"{peak_error(rs):.3f}", _mib(max(r["state_bytes"] for r in rs)),
                      _mib(max(r["planner_state_bytes"] for r in rs)),
                      f"{owner['transient_bytes_plain'] / owner['state_bytes']:.2f}" if owner["load_flops"] else "-",
                      _mib(sender["bytes_per_step"]), _mib(sender["planner_bytes_per_step"]),
                      f"{r0['load_max_over_mean']:.2f}"])
    lines.append(markdown_table(
        ["ranks", "model", "ZeRO", "owners", "optimizer", "syncs/step", "syncs/refresh", "Python ms/step",
         "our peak MiB", "planner peak MiB", "peak plan/sim - 1 (worst step)", "state MiB", "planner state MiB", "owner's plain transient/state", "sent MiB/step",
         "planner sent MiB/step", "load max/mean"], table))
    Path(out, "scale.md").write_text("\n".join(lines) + "\n")
    _plots(rows, out)


def peak_error(rows: list[dict[str, Any]]) -> float:
    """The planner's largest relative miss of a simulated step's peak, over ``rows`` and their steps."""
    return max(abs(p / m - 1) for r in rows for p, m in zip(r["planner_peak_bytes_by_step"], r["peak_bytes_by_step"]))


def _plots(rows: list[dict[str, Any]], out: str) -> None:
    """Python ms per step and our peak bytes against the world size (worst sampled rank), one
    line per (model, stage, optimizer) with flat ownership."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, dict[int, tuple[float, float]]] = {}
    for r in rows:
        if r["ownership"] != "flat":
            continue
        key = (r["model"], r["stage"], r["optimizer"])
        ms, peak = series.setdefault(key, {}).get(r["ranks"], (0.0, 0.0))
        series[key][r["ranks"]] = (max(ms, r["python_ms_per_step"]), max(peak, r["peak_bytes"]))
    for index, (name, label) in enumerate((("python_ms", "Python ms per step"), ("peak", "our peak GiB"))):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = {name: f"C{k}" for k, name in enumerate(VARIANTS)}  # colour: optimizer
        for (model, stage, optimizer), points in sorted(series.items()):
            worlds = sorted(points)
            ys = [points[w][index] / (1 if index == 0 else 2**30) for w in worlds]
            ax.plot(worlds, ys, color=colors.get(optimizer, "k"), linestyle="-" if model == "70b" else ":",
                    marker="s" if stage == 3 else "o", label=f"{model} ZeRO-{stage} {optimizer}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks (simulated)")
        ax.set_ylabel(label)
        if index == 0:
            ax.axhline(50, color="grey", linestyle="--", linewidth=1)  # the 50 ms target
        else:
            ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(Path(out, f"scale_{name}.png"), dpi=110)
        plt.close(fig)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS))
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--stages", type=int, nargs="+", default=list(STAGES))
    p.add_argument("--ownership", nargs="+", default=list(OWNERSHIP), choices=OWNERSHIP)
    p.add_argument("--layers", type=int, default=None, help="override the model's depth (smaller, faster)")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    optimizers = tuple(args.optimizers or VARIANTS)
    unknown = [o for o in optimizers if o not in VARIANTS]
    if unknown:
        raise ValueError(f"scale: unknown optimizer {unknown[0]!r}; expected one of {list(VARIANTS)}")
    if args.quick:
        todo = configs((8, 64), ("7b",), (2, 3), ("flat",), ("AdaDiag++",), layers=2)
    else:
        todo = configs(tuple(args.worlds), tuple(args.models), tuple(args.stages), tuple(args.ownership), optimizers,
                       args.layers)
    rows = run(todo, args.out)
    return {"rows": len(rows), "files": {"json": str(Path(args.out) / "scale.json"),
                                         "markdown": str(Path(args.out) / "scale.md")}}
