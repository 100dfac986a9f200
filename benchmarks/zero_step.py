"""Wall time of a ZeRO training step (fwd + bwd + optimizer) with our optimizers vs DeepSpeed's AdamW.

Starts N local CPU ranks (gloo) itself, builds the same small LLaMA
(transformers, no download) on every rank, and for each optimizer runs warm-up
steps, then times ``--steps`` engine steps (median). Our optimizer's refresh
period is shortened to ``--update-freq`` so the timed window contains refreshes
in their real proportion; ratios are against DeepSpeed's AdamW (torch
implementation, ``torch_adam``) in the same job. Also reports per-rank optimizer
state bytes and the bytes our step moved.

    python benchmarks/zero_step.py --ranks 2 --stage 2
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace) -> None:
    port = _free_port()
    threads = max(1, (os.cpu_count() or 2) // args.ranks)
    procs = []
    for rank in range(args.ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_structopt as dso

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    optimizers = {
        "AdamW (DeepSpeed)": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "weight_decay": 0.0}},
        "AdaDiag": {"type": "AdaDiag", "params": {"lr": 3e-3, "update_freq": args.update_freq}},
        "AdaDiag++": {"type": "AdaDiag++", "params": {"lr": 3e-3, "update_freq": args.update_freq}},
        "AdaDiag++ factored": {"type": "AdaDiag++", "params": {"lr": 3e-3, "update_freq": args.update_freq, "factored": True}},
        "ASGO": {"type": "ASGO", "params": {"lr": 1e-2}},
        "DASGO": {"type": "DASGO", "params": {"lr": 1e-2}},
    }
    results = {}
    gen = torch.Generator().manual_seed(0)
    micro = args.batch // world
    batches = [torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen) for _ in range(args.warmup + args.steps)]
    for name, block in optimizers.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          max_position_embeddings=args.seq, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
        ds_cfg = {"train_batch_size": args.batch, "train_micro_batch_size_per_gpu": micro,
                  "zero_optimization": {"stage": args.stage}, "optimizer": block, "steps_per_print": 10**9,
                  "gradient_clipping": 1.0}
        engine, *_ = dso.initialize(model=model, model_parameters=dso.param_groups(model), config=ds_cfg)
        times = []
        for i, b in enumerate(batches):
            ids = b.chunk(world)[rank]
            dist.barrier()
            start = time.perf_counter()
            loss = engine(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous()).loss
            engine.backward(loss)
            engine.step()
            dist.barrier()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        times.sort()
        entry = {"step_s": times[len(times) // 2], "mean_s": sum(times) / len(times)}
        if name != "AdamW (DeepSpeed)":
            m = dso.metrics(engine)
            gathered = [None] * world
            dist.all_gather_object(gathered, m)
            entry["state_bytes_per_rank"] = [g["state_bytes"] for g in gathered]
            entry["comm_bytes_per_step"] = gathered[0]["comm_bytes"] / (args.warmup + args.steps)
        results[name] = entry
        del engine
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        base = results.get("AdamW (DeepSpeed)")
        print(f"\nZeRO-{args.stage}, {world} CPU ranks x {os.environ.get('OMP_NUM_THREADS')} threads, LLaMA "
              f"{args.layers}x{args.hidden} ({params / 1e6:.1f}M params), batch {args.batch}x{args.seq}, "
              f"T={args.update_freq}, median of {args.steps} steps after {args.warmup} warm-up")
        print("| optimizer | step (s, median) | step (s, mean) | vs DeepSpeed AdamW (mean) | state bytes per rank | our comm bytes/step |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            ratio = r["mean_s"] / base["mean_s"] if base else float("nan")
            print(f"| {name} | {r['step_s']:.3f} | {r['mean_s']:.3f} | {ratio:.2f}x | {r.get('state_bytes_per_rank', '-')} | "
                  f"{r.get('comm_bytes_per_step', 0):.0f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--update-freq", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
