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
            if hasattr(layer.weight, "ds_tensor"):  # built under zero.Init: gather, init on rank 0, re-partition
                import deepspeed

                with deepspeed.zero.GatheredParameters(layer.weight, modifier_rank=0):
                    torch.nn.init.orthogonal_(layer.weight)
            else:
                torch.nn.init.orthogonal_(layer.weight)
    return model


IN_DIM = WIDTH = OUT_DIM = 32


class Block(torch.nn.Module):
    """LLaMA-like shapes: q/k/v/o (d x d), up (2d x d), down (d x 2d): 6 matrices, 2 norms' worth of vectors."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.norm = torch.nn.RMSNorm(d)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.o(torch.tanh(self.q(h)) * torch.tanh(self.k(h)) + self.v(h))
        return x + self.down(torch.tanh(self.up(self.norm(x))))


def build_blocks_model(seed: int, blocks: int = 4) -> torch.nn.Module:
    """4 blocks = 24 matrices of two shapes, for memory-balance and config tests."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[Block(WIDTH) for _ in range(blocks)])


def global_batches(steps: int, batch: int, seed: int = 123):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, IN_DIM, generator=gen), torch.randn(batch, OUT_DIM, generator=gen)) for _ in range(steps)]


VOCAB, TOKENS_PER_ROW = 128, 4


class EmbedModel(torch.nn.Module):
    """``embed_tokens`` (elementwise by name: AdamW) feeding build_model's square layers: each row
    is the sum of TOKENS_PER_ROW token embeddings, so the first layer's input (and every matrix's
    gradient) stays full rank whichever tokens a batch uses."""

    def __init__(self, seed: int):
        super().__init__()
        self.body = build_model(seed)
        torch.manual_seed(seed + 1)
        self.embed_tokens = torch.nn.Embedding(VOCAB, IN_DIM)
        torch.nn.init.normal_(self.embed_tokens.weight, std=0.5)

    def forward(self, ids):
        return self.body(self.embed_tokens(ids).sum(1))


def token_batches(steps: int, batch: int, seed: int = 123):
    """Even steps draw tokens from the first half of the vocabulary only, odd steps from all of it:
    the embedding rows VOCAB/2.. (the second half of its flattened elements: a whole piece at 2 or 4
    ranks under ZeRO-1/2/3) get an all-zero gradient at every even step, with the parameter's
    gradient non-zero and their moments non-zero from the odd steps."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        high = VOCAB // 2 if step % 2 == 0 else VOCAB
        out.append((torch.randint(0, high, (batch, TOKENS_PER_ROW), generator=gen),
                    torch.randn(batch, OUT_DIM, generator=gen)))
    return out


def build_wide_model(seed: int) -> torch.nn.Module:
    """build_model's layers at width 512 (557k parameters): at 2 ranks each ZeRO-3 partition is
    over the 1 MiB below which DeepSpeed's NVMe swapper keeps tensors in memory."""
    torch.manual_seed(seed)
    wide = 512
    model = torch.nn.Sequential(torch.nn.Linear(IN_DIM, wide), torch.nn.Tanh(), torch.nn.Linear(wide, wide),
                                torch.nn.Tanh(), torch.nn.Linear(wide, wide), torch.nn.Tanh(), torch.nn.Linear(wide, OUT_DIM))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.orthogonal_(layer.weight)
    return model


def case_model(case: dict) -> torch.nn.Module:
    builders = {"blocks": build_blocks_model, "embed": EmbedModel, "wide": build_wide_model}
    return builders.get(case.get("model"), build_model)(case.get("seed", 0))


def case_batches(case: dict, steps: int, batch: int):
    return (token_batches if case.get("model") == "embed" else global_batches)(steps, batch)


def train(engine, case: dict, world: int, rank: int, micro: int) -> dict:
    losses = []
    if case.get("load_dir"):
        engine.load_checkpoint(case["load_dir"])
    batches = case_batches(case, case["steps"], case["global_batch"])
    for step, (x, y) in enumerate(batches):
        if step < case.get("start_step", 0):
            continue
        if step == case.get("save_after"):
            engine.save_checkpoint(case["save_dir"])
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        for mx, my in zip(xs.split(micro), ys.split(micro)):
            out = engine(mx if not mx.is_floating_point() else mx.to(next(engine.module.parameters()).dtype))
            loss = ((out.float() - my) ** 2).mean()
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    if case.get("save_after") == case["steps"]:
        engine.save_checkpoint(case["save_dir"])
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, inner.metrics())
    if case.get("stage") == 3 or engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    else:
        params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    result = {"params": params, "metrics": gathered, "losses": losses, "wrapper": type(engine.optimizer).__name__}
    if case.get("host_bytes"):  # what DeepSpeed keeps in host memory for ZeRO-Offload besides our state
        zo = engine.optimizer
        flats = getattr(zo, "single_partition_of_fp32_groups", None) or getattr(zo, "fp32_partitioned_groups_flat", [])
        held = list(flats) + [f.grad for f in flats if f.grad is not None]
        held += list(getattr(zo, "param_buffer_of_bit16_for_cpu_offload_groups", []))
        result["deepspeed_host_bytes"] = [None] * world
        torch.distributed.all_gather_object(result["deepspeed_host_bytes"],
                                            sum(t.numel() * t.element_size() for t in held if t.device.type == "cpu"))
    if case.get("replica_params"):  # every rank's own copy (stage 0 replicas must stay equal)
        result["replicas"] = [None] * world
        torch.distributed.all_gather_object(result["replicas"], {n: t.cpu() for n, t in params.items()})
    if case.get("elem_state"):  # every rank's AdamW state of its pieces: {"name#start": {"step", "exp_avg", ...}}
        mine = {k: {n: (v.detach().float().cpu().clone() if torch.is_tensor(v) else v) for n, v in st.items()}
                for k, st in inner.elem_state.items()}
        result["elem_state"] = [None] * world
        torch.distributed.all_gather_object(result["elem_state"], mine)
    return result


def main(spec_path: str) -> None:
    import deepspeed
    import ds_structopt as dso

    spec = json.load(open(spec_path))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    for case in spec["cases"]:
        if case.get("zero_init"):  # parameters partitioned at construction (p.ds_shape, local (0,) tensors)
            with dso.zero_init({"train_batch_size": case["global_batch"], "zero_optimization": {"stage": 3},
                                "bf16": {"enabled": bool(case.get("bf16"))},
                                "optimizer": {"type": case["optimizer"], "params": case["params"]}}):
                model = case_model(case)
            assert all(p.numel() == 0 or p.ds_tensor is not None for p in model.parameters())
        else:
            model = case_model(case)
        if "config_path" in case:  # exactly as a user passes it
            file_cfg = json.load(open(case["config_path"]))
            case["global_batch"] = file_cfg["train_batch_size"]
            micro = file_cfg["train_micro_batch_size_per_gpu"]
            engine, opt, _, _ = dso.initialize(model=model, model_parameters=dso.param_groups(model), config=case["config_path"])
            results[case["name"]] = train(engine, case, world, rank, micro)
            continue
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
        if case.get("bf16"):
            cfg["bf16"] = {"enabled": True}
        cfg.update(case.get("extra_config", {}))
        engine, opt, _, _ = dso.initialize(model=model, model_parameters=dso.param_groups(model), config=cfg)
        results[case["name"]] = train(engine, case, world, rank, micro)
    if rank == 0:
        torch.save(results, spec["out"])
    torch.distributed.barrier()
    print("WORKER-DONE", flush=True)  # the work is complete; launch.py tolerates a crash after this line
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
