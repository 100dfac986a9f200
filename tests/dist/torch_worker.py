"""Real ranks training with plain PyTorch data parallelism (DDP or FSDP2) and our optimizer.

Same model, batches and loss as tests/dist/worker.py; each case wraps the model with
``DistributedDataParallel`` or ``fully_shard`` and steps ``ds_structopt``'s distributed optimizer.
Rank 0 saves the final full parameters and every rank's metrics.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from worker import build_model, global_batches


def full_params(model) -> dict:
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n.removeprefix("module.")] = t.detach().float().clone()
    return out


def run_case(case: dict, world: int, rank: int) -> dict:
    from ds_structopt.integrations.torch_parallel import distributed_optimizer

    model = build_model(case.get("seed", 0))
    if case["wrap"] == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    from ds_structopt import checkpoint

    opt = distributed_optimizer(model, case["optimizer"], **case["params"])
    if case.get("load_dir"):  # our checkpoint alone restores weights (fp32 pieces) and optimizer state
        checkpoint.load(opt, case["load_dir"])
    for step, (x, y) in enumerate(global_batches(case["steps"], case["global_batch"])):
        if step < case.get("start_step", 0):
            continue
        if step == case.get("save_after"):
            checkpoint.save(opt, case["save_dir"])
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = ((model(xs) - ys) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    if case.get("save_after") == case["steps"]:
        checkpoint.save(opt, case["save_dir"])
    gathered = [None] * world
    dist.all_gather_object(gathered, opt.metrics())
    return {"params": full_params(model), "metrics": gathered}


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {case["name"]: run_case(case, world, rank) for case in spec["cases"]}
    if rank == 0:
        torch.save(results, spec["out"])
    dist.barrier()
    print("WORKER-DONE", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
