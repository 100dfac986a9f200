"""Dist suite: 1/2/4 CPU ranks at ZeRO 1/2/3, our optimizers vs DeepSpeed's own AdamW on the same model.

For each (ranks, stage) it starts real gloo ranks (one process each, one
thread each) running DeepSpeed engines on the same small LLaMA and batches,
and measures per optimizer: optimizer-state bytes per rank, bytes handed to
collectives per step (every ``torch.distributed`` collective DeepSpeed and we
issue during the timed steps, input bytes summed over ranks: the same
accounting for both), and the median step time (fwd+bwd+step). The refresh
period is short (``--update-freq``) so the timed window holds refreshes in
their real proportion.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..optim.registry import get_optimizer_class
from ..tables import markdown_table
from . import report

OURS = {
    "AdaDiag": {"type": "AdaDiag", "params": {"lr": 3e-3}},
    "AdaDiag++": {"type": "AdaDiag++", "params": {"lr": 3e-3}},
    "AdaDiag++ factored": {"type": "AdaDiag++", "params": {"lr": 3e-3, "factored": True}},
    "ASGO": {"type": "ASGO", "params": {"lr": 1e-2}},
    "DASGO": {"type": "DASGO", "params": {"lr": 1e-2}},
}
BASELINE = "AdamW (DeepSpeed)"
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "_all_gather_base", "all_to_all_single", "gather",
               "scatter", "send", "recv", "isend", "irecv", "all_gather_object", "broadcast_object_list")


class CommCounter:
    """Counts the bytes of every tensor handed to a torch.distributed collective while ``active``."""

    def __init__(self) -> None:
        self.bytes, self.calls, self.active, self.depth = 0, 0, False, 0
        self._originals: dict[tuple[Any, str], Any] = {}

    @staticmethod
    def _size(obj: Any) -> int:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(CommCounter._size(o) for o in obj)
        return 0

    def install(self) -> "CommCounter":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in COLLECTIVES:
            # one wrapper for both names of a function: torch checks P2POp(op) by identity
            wrapped: dict[int, Any] = {}
            for module in (c10d, dist):
                fn = getattr(module, name, None)
                if fn is None or (module, name) in self._originals:
                    continue
                self._originals[(module, name)] = fn
                if id(fn) not in wrapped:
                    wrapped[id(fn)] = self._wrap(fn, name)
                setattr(module, name, wrapped[id(fn)])
        return self

    def _wrap(self, fn: Any, name: str) -> Any:
        counter = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            if counter.active and counter.depth == 0 and name not in ("recv", "irecv"):  # receive buffers are outputs
                # what this rank contributes: the input tensor(s), not output buffers
                first = args[0] if args else next(iter(kwargs.values()), None)
                if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                            "reduce_scatter_tensor", "_reduce_scatter_base") and len(args) > 1:
                    first = args[1]
                counter.bytes += counter._size(first)
                counter.calls += 1
            counter.depth += 1  # collectives built from other collectives count once
            try:
                return fn(*args, **kwargs)
            finally:
                counter.depth -= 1
        return counted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_warnings(text: str) -> str:
    """A rank's output less the FutureWarning pairs torch prints per collective, so the real error is visible."""
    lines = text.splitlines()
    keep = [ln for i, ln in enumerate(lines)
            if "FutureWarning" not in ln and not (ln.strip() == "return func(*args, **kwargs)")]
    return "\n".join(keep)


def optimizer_state_bytes(engine: Any) -> int:
    """Tensor bytes in the state of the optimizer DeepSpeed steps (ours reports its own)."""
    import torch

    import ds_structopt as dso
    from ds_structopt.integrations.deepspeed import find_optimizer

    ours = find_optimizer(engine)
    if ours is not None:
        return int(dso.metrics(engine)["state_bytes"])
    opt, seen = engine.optimizer, set()
    while hasattr(opt, "optimizer") and id(opt) not in seen:
        seen.add(id(opt))
        opt = opt.optimizer
    return sum(t.numel() * t.element_size() for st in getattr(opt, "state", {}).values()
               for t in st.values() if isinstance(t, torch.Tensor))


def llama_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The LlamaConfig of a dist run (the planner test builds the same model)."""
    return dict(vocab_size=256, hidden_size=cfg["hidden"], intermediate_size=int(cfg["hidden"] * 2.75),
                num_hidden_layers=cfg["layers"], num_attention_heads=max(1, cfg["hidden"] // 64),
                max_position_embeddings=cfg["seq_len"], tie_word_embeddings=False)


def _our_comm_bytes(engine: Any) -> int:
    """Bytes our step has sent so far on this rank (0 for DeepSpeed's own optimizer)."""
    from ds_structopt.integrations.deepspeed import find_optimizer

    ours = find_optimizer(engine)
    return 0 if ours is None else int(ours.comm_bytes)


def worker(cfg: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_structopt as dso

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    counter = CommCounter().install()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (cfg["batch"], cfg["seq_len"] + 1), generator=gen)
               for _ in range(cfg["warmup"] + cfg["steps"])]
    blocks = {BASELINE: {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "weight_decay": 0.0}}}
    for name in cfg["optimizers"]:
        block = json.loads(json.dumps(OURS[name]))
        if "update_freq" in get_optimizer_class(block["type"]).DEFAULTS:
            block["params"]["update_freq"] = cfg["update_freq"]
            block["params"].update(cfg.get("options") or {})
        blocks[name] = block
    results = {}
    for name, block in blocks.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**llama_kwargs(cfg)))
        ds_cfg = {"train_batch_size": cfg["batch"], "train_micro_batch_size_per_gpu": cfg["batch"] // world,
                  "zero_optimization": {"stage": cfg["stage"]}, "optimizer": block, "steps_per_print": 10**9,
                  "gradient_clipping": 1.0}
        if cfg.get("ds_structopt") and name != BASELINE:
            ds_cfg["ds_structopt"] = cfg["ds_structopt"]
        engine, *_ = dso.initialize(model=model, model_parameters=dso.param_groups(model), config=ds_cfg)
        times, counter.bytes, counter.calls = [], 0, 0
        ours_before = None
        for i, b in enumerate(batches):
            ids = b.chunk(world)[rank]
            dist.barrier()
            counter.active = i >= cfg["warmup"]
            if i == cfg["warmup"]:
                ours_before = _our_comm_bytes(engine)
            start = time.perf_counter()
            loss = engine(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous()).loss
            engine.backward(loss)
            engine.step()
            counter.active = False
            dist.barrier()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
        times.sort()
        results[name] = {"step_s": times[len(times) // 2], "mean_s": sum(times) / len(times),
                         "state_bytes": optimizer_state_bytes(engine),
                         "comm_bytes_per_step": counter.bytes / cfg["steps"], "comm_calls_per_step": counter.calls / cfg["steps"],
                         "our_comm_bytes_per_step": (_our_comm_bytes(engine) - ours_before) / cfg["steps"],
                         "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())}
        del engine
    write_rank_result(cfg["out"], rank, results)


def launch_ranks(module: str, cfg: dict[str, Any], timeout: float = 1200) -> list[dict[str, Any]]:
    """Run ``python -m <module> --worker <cfg>`` on ``cfg['ranks']`` gloo ranks (one thread each);
    returns every rank's results (the worker writes ``rank<r>.json`` into ``cfg['out']``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(cfg, out=tmp)
        port, procs = _free_port(), []
        for rank in range(cfg["ranks"]):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg["ranks"]),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, "-m", module, "--worker", json.dumps(cfg)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        try:
            outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"{module} ranks={cfg['ranks']}: no result after {timeout:.0f} s (ranks killed)")
        failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode]
        finished = all(Path(tmp, f"rank{r}.json").exists() for r in range(cfg["ranks"]))
        if failed and finished:
            # every rank passed the final barrier with its results written: a crash in gloo's
            # teardown after that cannot have touched the measurements
            print(f"[bench] warning: ranks {[r for r, _ in failed]} exited non-zero after writing their results "
                  "(process-group teardown)", file=sys.stderr)
        elif failed:
            tails = "\n".join(f"--- rank {r} exit {rc}:\n{_without_warnings(outputs[r])[-3000:]}" for r, rc in failed)
            raise RuntimeError(f"{module} ranks={cfg['ranks']} failed:\n{tails}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(cfg["ranks"])]


def write_rank_result(out_dir: str, rank: int, results: Any) -> None:
    """Whole file or none, then the final barrier every rank passes before tearing down."""
    import torch.distributed as dist

    tmp_out = Path(out_dir, f".rank{rank}.json")
    tmp_out.write_text(json.dumps(results))
    tmp_out.rename(tmp_out.with_name(f"rank{rank}.json"))
    dist.barrier()
    dist.destroy_process_group()


def run_config(cfg: dict[str, Any], timeout: float = 1200) -> dict[str, Any]:
    """Start ``cfg['ranks']`` ranks, wait, and merge their per-rank results."""
    per_rank = launch_ranks("ds_structopt.bench.dist", cfg, timeout)
    merged = {}
    for name in per_rank[0]:
        rs = [pr[name] for pr in per_rank]
        merged[name] = {"step_s": max(r["step_s"] for r in rs), "state_bytes_per_rank": [r["state_bytes"] for r in rs],
                        "comm_bytes_per_step": sum(r["comm_bytes_per_step"] for r in rs),
                        "our_comm_bytes_per_step": sum(r["our_comm_bytes_per_step"] for r in rs),
                        "comm_calls_per_step": rs[0]["comm_calls_per_step"], "params": rs[0]["params"]}
    base = merged[BASELINE]
    for r in merged.values():
        r["step_ratio"] = r["step_s"] / base["step_s"]
        r["comm_ratio"] = r["comm_bytes_per_step"] / base["comm_bytes_per_step"] if base["comm_bytes_per_step"] else None
        r["max_state_bytes_per_param"] = max(r["state_bytes_per_rank"]) / r["params"]
    return {"ranks": cfg["ranks"], "stage": cfg["stage"], "results": merged}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--update-freq", type=int, default=10)


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    names = list(args.optimizers or ["AdaDiag++", "AdaDiag++ factored"])
    unknown = [n for n in names if n not in OURS]
    if unknown:
        raise ValueError(f"dist suite: unknown optimizer(s) {unknown}; choose from {sorted(OURS)}")
    base = {"hidden": args.hidden, "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
            "steps": args.steps, "warmup": args.warmup, "update_freq": args.update_freq, "optimizers": names}
    ranks, stages = args.ranks, args.stages
    if args.quick:
        ranks, stages = [2], [1, 2, 3]
        base.update(hidden=64, layers=2, batch=8, seq_len=32, steps=3, warmup=1, update_freq=2)
    runs = []
    for n in ranks:
        for stage in stages:
            t = time.perf_counter()
            runs.append(run_config(dict(base, ranks=n, stage=stage)))
            print(f"[dist] {n} ranks ZeRO-{stage}: {time.perf_counter() - t:.0f} s", flush=True)
    return write(args.out, base, runs)


def write(out_dir: str | Path, settings: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    headers = ["ranks", "ZeRO", "optimizer", "step s (max over ranks)", "step / DS AdamW", "comm MB/step",
               "comm / DS AdamW", "state MB per rank", "max state B/param on a rank"]
    rows = []
    for run in runs:
        for name, r in run["results"].items():
            rows.append([run["ranks"], run["stage"], name, r["step_s"], r["step_ratio"], r["comm_bytes_per_step"] / 1e6,
                         r["comm_ratio"], " / ".join(f"{b / 1e6:.2f}" for b in r["state_bytes_per_rank"]),
                         r["max_state_bytes_per_param"]])
    md = (f"Dist: LLaMA {settings['layers']} x {settings['hidden']}, batch {settings['batch']} x {settings['seq_len']}, "
          f"T = {settings['update_freq']}, median of {settings['steps']} steps after {settings['warmup']} warm-up; "
          "comm = bytes handed to torch.distributed collectives per step, summed over ranks\n\n"
          + markdown_table(headers, rows))
    plots = []
    multi = [r for r in runs if r["ranks"] > 1]
    if multi:
        labels, values = [], []
        for run in multi:
            for name, r in run["results"].items():
                if name != BASELINE and r["comm_ratio"] is not None:
                    labels.append(f"{name} {run['ranks']}r Z{run['stage']}")
                    values.append(r["comm_ratio"])
        if values:
            plots.append(report.bar_plot(out / "dist_comm_ratio.png", labels, values, "bytes / DeepSpeed AdamW",
                                         "communication per step relative to DeepSpeed AdamW", reference=1.0))
    files = report.write(out, "dist", {"settings": settings, "runs": runs, "plots": plots}, md)
    return {"files": files, "plots": plots}


def worker_entry(run: Any, argv: Optional[list[str]] = None) -> None:
    """``python -m <suite module> --worker <json>``: what ``launch_ranks`` starts on each rank."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        run(json.loads(argv[1]))


def main(argv: Optional[list[str]] = None) -> None:
    worker_entry(worker, argv)


if __name__ == "__main__":
    main()
