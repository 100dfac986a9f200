"""A real multi-rank DeepSpeed job for the integration tests (one process per rank, gloo on CPU).

Started by tests/dist/launch.py with torchrun-style environment variables. For
each case in the JSON spec it builds the same small model on every rank, calls
ds_structopt.initialize with a real DeepSpeed config, trains K steps on this
rank's share of a fixed global batch and, on rank 0, saves the final
parameters (and per-rank metrics) for the test to compare.
"""
import json
import os
import sys

import torch


def build_model(seed: int) -> torch.nn.Module:
    """Square layers, orthogonal init and a batch larger than every width: every gradient is
    full rank with well-separated singular values and no null space. A narrowing layer or a
    norm layer makes singular values (numerically) zero, and a non-square matrix has an
    arbitrary null-space basis (ALGORITHMS.md ambiguity 2); Adam in a rotated basis turns fp32
    round-off in such directions into full-size steps, so two reduction orders would not
    agree. 4 x 32 x 32 + biases: the flat partitions of 2 or 4 ranks split matrices."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, WIDTH), torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, OUT_DIM),
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):  # orthogonal: products of layers stay well conditioned
            torch.nn.init.orthogonal_(layer.weight)
    return model


IN_DIM = WIDTH = OUT_DIM = 32


def global_batches(steps: int, batch: int, seed: int = 123):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, IN_DIM, generator=gen), torch.randn(batch, OUT_DIM, generator=gen)) for _ in range(steps)]


def main(spec_path: str) -> None:
    import deepspeed
    import ds_structopt as dso

    spec = json.load(open(spec_path))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    for case in spec["cases"]:
        model = build_model(case.get("seed", 0))
        micro = case["global_batch"] // world // case.get("grad_accum", 1)
        cfg = {
            "train_batch_size": case["global_batch"],
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": case.get("grad_accum", 1),
            "optimizer": {"type": case["optimizer"], "params": case["params"]},
            "zero_optimization": {"stage": case["stage"]},
            "steps_per_print": 10**9,
            "gradient_clipping": case.get("clip", 0.0),  # DeepSpeed's default is 1.0
        }
        engine, opt, _, _ = dso.initialize(model=model, model_parameters=dso.param_groups(model), config=cfg)
        for x, y in global_batches(case["steps"], case["global_batch"]):
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            for mx, my in zip(xs.split(micro), ys.split(micro)):
                loss = ((engine(mx) - my) ** 2).mean()
                engine.backward(loss)
                engine.step()
        inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        metrics = inner.metrics()
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, metrics)
        params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        results[case["name"]] = {"params": params, "metrics": gathered}
    if rank == 0:
        torch.save(results, spec["out"])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
