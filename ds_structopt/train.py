"""LLaMA pretraining with a DeepSpeed JSON and ds_structopt.initialize, under any launcher.

    deepspeed --num_gpus 2 -m ds_structopt.train --model tiny --deepspeed_config configs/ds_adadiagpp_zero2.json
    torchrun --nproc_per_node 2 -m ds_structopt.train ...      (or: ds-structopt train ...)

Builds ``LlamaForCausalLM`` from ``configs/models/<name>.json`` (or a path; no
download), packs the data (default: the embedded corpus, byte tokens) into
fixed-length rows, and trains with the batch sizes of the DeepSpeed config.
Warmup + cosine LR (unless the config has its own scheduler), periodic eval
(loss, perplexity), atomic rotated checkpoints, ``--resume`` from the latest
one (data order included), progress line, metrics.csv (+ TensorBoard when
installed) and a loss-curve PNG on rank 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a LLaMA model with a ds_structopt optimizer under DeepSpeed.")
    p.add_argument("--model", default="tiny", help="name in configs/models (tiny, 60m, 130m, 350m, 1b) or a JSON path")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=str(CONFIG_DIR / "ds_tiny_adadiagpp_zero2.json"))
    p.add_argument("--data", nargs="+", default=["embedded"], help="files, directories, .jsonl, .parquet, the built-in 'embedded' / 'stdlib', or one prepared dataset, memory-mapped: a ds-structopt prepare-data folder or a Megatron .bin/.idx prefix")
    p.add_argument("--tokenizer", default=None, help="local tokenizer.json or tokenizer folder (default: bytes)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup steps (>= 1) or fraction of --steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-rows", type=int, default=128,
                   help="held-out sequences per eval (fixed, so eval loss does not depend on batch size or ranks)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--output-dir", default="runs/train")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --output-dir that already holds checkpoints (they are deleted)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    import ds_structopt as dso
    from ds_structopt import faults
    from ds_structopt.data.corpus import load_corpus
    from ds_structopt.data.sampler import ShardedBatchSampler
    from ds_structopt.integrations.deepspeed import find_optimizer
    from ds_structopt.integrations.deepspeed_config import load_config
    from ds_structopt.training import checkpoints, preemption, run_config
    from ds_structopt.training.logs import TrainLog
    from ds_structopt.training.models import model_config, model_file
    from ds_structopt.training.schedule import warmup_cosine, warmup_steps

    faults.install()  # no-op unless DS_STRUCTOPT_FAULTS is set (tests)
    preemption.install()  # SIGTERM/SIGUSR1/SIGUSR2 only set a flag; acted on at a step boundary (below)
    if faults.active() and int(os.environ.get("RANK", 0)) == 0:
        print(f"WARNING: fault injection is ON ({faults.ENV}={os.environ[faults.ENV]!r}): this run will be "
              "killed, hung or poisoned on purpose; unset it for real training", flush=True)
    ds_cfg = load_config(args.deepspeed_config)
    data = load_corpus(args.data, args.tokenizer, args.seq_len)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args.model, data.vocab_size, args.seq_len))
    engine, _, _, scheduler = dso.initialize(model=model, model_parameters=dso.param_groups(model), config=ds_cfg)
    rank, world = engine.global_rank, engine.world_size
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    sampler = ShardedBatchSampler(len(data.train), engine.train_batch_size(), world, rank, seed=args.seed)
    ckpt_root = os.path.join(args.output_dir, "checkpoints")

    # the config's LRs, before a resume restores the groups' values as the schedule left them
    base_lrs = [g["lr"] for g in engine.optimizer.param_groups]
    start_step = 0
    # this run's settings, saved in every checkpoint and judged against the checkpoint's at --resume
    run = run_config.describe(args, ds_cfg, world, global_batch=engine.train_batch_size(),
                              train_rows=len(data.train), model_config=json.loads(model_file(args.model).read_text()))
    if not args.resume:
        _refuse_to_overwrite(ckpt_root, args.overwrite, rank)
    if args.resume and (tag := _resume_tag(ckpt_root, engine)) is not None:
        try:  # before anything is loaded: a refused change leaves the checkpoint untouched
            at = int(tag[4:]) if tag[4:].isdigit() else None  # "step00000010"
            run_config.check_resume(os.path.join(ckpt_root, tag), run, rank, at,
                                    log=lambda line: print(line, flush=True))
        except run_config.ResumeMismatch as exc:
            raise SystemExit(f"error: {exc}") from None
        _, client = engine.load_checkpoint(ckpt_root, tag=tag)
        sampler.load_state_dict(client["sampler"])
        start_step = int(client["step"])
        restored = checkpoints.restore_rank_state(os.path.join(ckpt_root, tag), rank, engine.device)
        missing = [r for r, ok in enumerate(checkpoints.gather_objects(restored)) if not ok]
        if rank == 0:
            print(f"resumed from {ckpt_root}/{tag} at step {start_step}", flush=True)
            if missing:  # more ranks than saved (or an older checkpoint): dropout etc. will not replay exactly
                print(f"warning: the checkpoint has no random generator state for rank{'s' * (len(missing) > 1)} "
                      f"{' '.join(map(str, missing))}: their generators stay as seeded (--seed), so random draws "
                      "(dropout, sampling) there do not continue the saved streams", flush=True)
    log = TrainLog(args.output_dir, args.steps, enabled=rank == 0, resume=start_step > 0)
    warmup = warmup_steps(args.warmup, args.steps)
    tokens_per_step = engine.train_batch_size() * args.seq_len
    eval_rows = data.eval[: args.eval_rows] if len(data.eval) else data.train[: args.eval_rows]
    if len(eval_rows) >= world:  # equal shares: every rank runs the same number of forwards (ZeRO-3 gathers)
        eval_rows = eval_rows[: len(eval_rows) // world * world]

    def eval_loss() -> float:
        rows = eval_rows.chunk(world)[rank] if len(eval_rows) >= world else eval_rows  # else: all ranks, all rows
        return evaluate(engine, rows, micro)

    first_loss = eval_loss() if start_step == 0 else None
    t0, last = time.perf_counter(), {}
    ours = find_optimizer(engine)
    preempted: Optional[dict[str, Any]] = None
    for step in range(start_step, args.steps):
        faults.at_step(step + 1, rank)
        skipped_before = _skipped(engine, ours)
        if scheduler is None:
            for g, base in zip(engine.optimizer.param_groups, base_lrs):
                g["lr"] = base * warmup_cosine(step, args.steps, warmup, args.min_lr_ratio)
        loss = train_step(engine, data.train[sampler.next_indices()], micro, accum,
                            poison=faults.poison_loss(step + 1, rank))
        done = step + 1
        if _skipped(engine, ours) > skipped_before and rank == 0:
            print(f"warning: step {done}: non-finite gradients on some rank, optimizer step skipped on all ranks "
                  f"(weights and optimizer state unchanged; {_skipped(engine, ours)} skipped so far)", flush=True)
        row: dict[str, Any] = {}
        if done % args.eval_every == 0 or done == args.steps:
            ev = eval_loss()
            row.update(eval_loss=ev, eval_ppl=math.exp(min(ev, 50)))
        if done % args.log_every == 0 or row or done == args.steps:
            elapsed = time.perf_counter() - t0
            row.update(step=done, train_loss=global_loss(loss), lr=engine.optimizer.param_groups[0]["lr"],
                       tokens=done * tokens_per_step, seconds=round(elapsed, 3),
                       tokens_per_s=(done - start_step) * tokens_per_step / max(elapsed, 1e-9),
                       skipped_steps=_skipped(engine, ours), **_health(ours, engine.device))
            log.write(row, start_step)
            last = row
        saved = None
        if done % args.save_every == 0 or done == args.steps:
            saved = checkpoints.save(engine, ckpt_root, done, {"sampler": sampler.state_dict(), "step": done},
                                     args.keep_last, run=run)
        # Every rank learns here whether ANY rank was signalled (one tiny all-reduce), so all stop
        # at this same step and the collective save below is complete. After the last step the
        # run is simply done.
        if done < args.steps and (sig := preemption.agree(engine.device)) is not None:
            if saved is None:
                saved = checkpoints.save(engine, ckpt_root, done, {"sampler": sampler.state_dict(), "step": done},
                                         args.keep_last, run=run)
            preempted = {"signal": sig, "step": done, "checkpoint": saved}
            if rank == 0:
                print(f"preempted by {sig} at step {done}: " + (
                    f"checkpoint saved to {saved}; rerun with --resume" if saved is not None else
                    f"checkpoint NOT saved (see the warning above); --resume continues from "
                    f"{checkpoints.latest(ckpt_root)}"), flush=True)
            break
    png = log.plot()
    result = {"first_eval_loss": first_loss, "final": last, "loss_curve": png, "rank": rank, "world_size": world,
              "placement": _placement(), "faults_injected": os.environ.get(faults.ENV) if faults.active() else None,
              "preempted": preempted}
    if rank == 0:
        (Path(args.output_dir) / "result.json").write_text(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.barrier()
        # An initialized gloo group left to interpreter shutdown can abort in its worker threads
        # (seen under mpirun after a successful run): tear it down while everything is alive.
        dist.destroy_process_group()
    return result


def train_step(engine: Any, rows: torch.Tensor, micro: int, accum: int, poison: bool = False) -> torch.Tensor:
    """One optimizer step over ``accum`` micro-batches of ``rows``; returns this rank's mean loss
    as a tensor on ``engine.device`` (no host sync: :func:`global_loss` reads it when logged).
    Batches go to ``engine.device`` (DeepSpeed's forward does not move inputs)."""
    losses = []
    for batch in rows.long().split(micro)[:accum]:
        batch = batch.to(engine.device, non_blocking=True)
        loss = engine(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous()).loss
        if poison:  # fault injection (tests): a non-finite loss on this rank
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
    return torch.stack(losses).mean()


def global_loss(local: torch.Tensor) -> float:
    """The loss of the whole global batch: every rank's mean over the same number of rows,
    averaged over ranks (rank 0's share alone would change with the world size)."""
    import torch.distributed as dist

    total = local.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total.item()


def evaluate(engine: Any, rows: torch.Tensor, micro: int) -> float:
    """Mean loss over this rank's ``rows``, weighted by rows and summed over ranks. The sums
    live on ``engine.device``: under NCCL a CPU tensor in the all-reduce would crash."""
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, device=engine.device)
    with torch.no_grad():
        for batch in rows.long().split(micro):
            batch = batch.to(engine.device)
            loss = engine(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous()).loss
            total[0] += loss.detach().float() * len(batch)
            total[1] += len(batch)
    if dist.is_initialized():
        dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


def _refuse_to_overwrite(root: str, overwrite: bool, rank: int) -> None:
    """A run without --resume must not rotate a previous run's checkpoints away (or mix with them)."""
    import shutil

    import torch.distributed as dist

    from ds_structopt.training import checkpoints

    found: list[Any] = [checkpoints.candidates(root) if rank == 0 else None]  # rank 0's disk decides for all
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    existing = found[0]
    if existing and not overwrite:
        raise SystemExit(f"error: {root} already holds checkpoints (newest: {existing[0]}); pass --resume to "
                         "continue that run or --overwrite to delete them and start over")
    if existing and rank == 0:
        shutil.rmtree(root)
    if existing and dist.is_initialized():
        dist.barrier()


def _resume_tag(root: str, engine: Any) -> Optional[str]:
    """The newest intact checkpoint, agreed by all ranks: each checks its share of the files
    against the manifest (``checkpoints.resume_tag``)."""
    from ds_structopt.training import checkpoints

    try:
        return checkpoints.resume_tag(root, engine.global_rank, engine.world_size, engine.device)
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None


def _skipped(engine: Any, ours: Any) -> int:
    """Optimizer steps skipped for non-finite gradients: by DeepSpeed's ZeRO-1/2 overflow check (it
    then never calls our step) or by ours (every other stage); the same count on every rank."""
    return int(getattr(engine, "skipped_steps", 0)) + (ours.skipped_steps if ours is not None else 0)


def _health(ours: Any, device: Any) -> dict[str, Any]:
    """Decomposition-failure counters summed over ranks; the last step's structured updates
    (summed over one replica group's owners: the model's count) and AdamW updates; every rank's RSS (``rss_mb``: rank 0's,
    ``rss_mb_max``: the largest, ``rss_mb_ranks``: all, space-separated in rank order) and rank 0's
    open files. One all-reduce carries it all: rank r fills slot r of an RSS vector, zeros elsewhere."""
    import torch.distributed as dist

    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    values = ours.metrics() if ours is not None else {}
    try:
        with open("/proc/self/status") as f:
            rss_kb: Optional[int] = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):  # not Linux
        rss_kb = None
    counted = ("decomp_failures", "identity_fallbacks", "structured_updates", "structured_updates_total")
    slots = [float(values.get(k, 0)) for k in counted] + [0.0] * world
    slots[len(counted) + rank] = float(rss_kb if rss_kb is not None else -1)  # KiB: exact in float64
    vector = torch.tensor(slots, dtype=torch.float64, device=device)  # all-reduced: on the rank's GPU under NCCL
    if dist.is_initialized():
        dist.all_reduce(vector)
    failures, fallbacks, structured, structured_total, *rss_ranks_kb = vector.tolist()
    out: dict[str, Any] = {"decomp_failures": int(failures), "identity_fallbacks": int(fallbacks)}
    if values:  # each matrix is counted by its owner in every replica group; AdamW's count is the model's
        replicas = int(values.get("replica_groups", 1))
        out.update(structured_updates=int(structured) // replicas, eligible_matrices=int(values["eligible_matrices"]),
                   elementwise_updates=int(values["elementwise_updates"]),
                   structured_updates_total=int(structured_total) // replicas)
    if rss_kb is None:
        return out
    ranks_mb = [round(kb / 1024, 1) for kb in rss_ranks_kb]
    out.update(rss_mb=ranks_mb[0], rss_mb_max=max(ranks_mb), rss_mb_ranks=" ".join(f"{mb:.1f}" for mb in ranks_mb))
    try:
        out["open_fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return out


def _placement() -> list[str]:
    """Node of every rank (SLURM's node name where there is one), so a run can show where it ran."""
    import socket

    from ds_structopt.training import checkpoints

    return checkpoints.gather_objects(os.environ.get("SLURMD_NODENAME") or socket.gethostname())


if __name__ == "__main__":
    main()
