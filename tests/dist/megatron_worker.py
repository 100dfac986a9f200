"""Real ranks training a tiny megatron-core GPTModel with our optimizer (gloo, CPU shim from tests/).

Each case sets up megatron's parallel state (TP size from the case, DP = world / TP),
builds the model, loads its initial weights from a dist-checkpoint written by the
"init" case (megatron reshards them to any TP size), wraps it in megatron's DDP,
steps ``get_megatron_structopt_optimizer`` on a fixed global batch per step and
saves the final model with dist-checkpointing. A "dump" case loads such a
checkpoint at TP=1 and returns the full parameters, so runs at different TP/DP
sizes are compared in one layout without our own TP code in the loop.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the CPU shim)

VOCAB, SEQ, GLOBAL_BATCH = 128, 32, 8


def model_config(bf16: bool, fp64: bool = False, fp16: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=128, use_cpu_initialization=True, normalization="RMSNorm",
                             gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
                             hidden_dropout=0.0, attention_dropout=0.0, bf16=bf16, fp16=fp16,
                             params_dtype=(torch.bfloat16 if bf16 else torch.float16 if fp16 else
                                           torch.float64 if fp64 else torch.float32))


def build_model(bf16: bool = False, fp64: bool = False, fp16: bool = False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(config=model_config(bf16, fp64, fp16), transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")


def global_batch(step: int) -> torch.Tensor:
    """Arithmetic progressions mod VOCAB (learnable: next = 2 x last - the one before)."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 8, (GLOBAL_BATCH, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def setup(tp: int) -> None:
    import megatron_cpu
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    megatron_cpu.install(seed=1234)


def load_model(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))


def save_model(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)


def run_train(case: dict) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.module import Float16Module

    from ds_structopt.integrations.megatron_core import get_megatron_structopt_optimizer, load_checkpoint, save_checkpoint

    setup(case.get("tp", 1))
    bf16 = case.get("bf16", False)
    fp64, fp16 = case.get("fp64", False), case.get("fp16", False)
    cfg = model_config(bf16, fp64, fp16)
    model = build_model(bf16, fp64, fp16)
    load_model(model, case["init"])
    module = Float16Module(cfg, model) if (bf16 or fp16) else model
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=False,
                                                                    grad_reduce_in_fp32=not fp64), module)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=case.get("lr", 3e-3), weight_decay=0.01, clip_grad=case.get("clip_grad", 1.0), bf16=bf16,
                              fp16=fp16, initial_loss_scale=case.get("initial_loss_scale", 2.0**32),
                              adam_beta1=0.9, adam_beta2=0.95)
    opt = get_megatron_structopt_optimizer(opt_cfg, [ddp], case.get("optimizer", "AdaDiag++"),
                                           case.get("options", {"update_freq": 3}), tp_mode=case.get("mode", "gather"))
    start = 0
    if case.get("resume"):
        start = load_checkpoint(case["resume"], [ddp], opt)["iteration"]
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = GLOBAL_BATCH // dp
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    pos = torch.arange(SEQ)[None].expand(rows, SEQ)
    losses, norms, skipped, scales = [], [], [], []
    for step in range(start, case["steps"]):
        tokens = global_batch(step)[dp_rank * rows:(dp_rank + 1) * rows]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).float().mean()
        opt.scale_loss(loss).backward()  # x loss scale (fp16), as megatron's schedule does
        finalize_model_grads([ddp])
        ok, norm, _ = opt.step()
        assert ok or fp16, f"step {step} skipped"
        skipped.append(not ok)
        scales.append(float(opt.get_loss_scale()))
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=ps.get_data_parallel_group())
        losses.append(reported.item() / dp)
        norms.append(float(norm or 0.0))
        if case.get("save_at") == step + 1:
            save_checkpoint(case["ckpt"], step + 1, [ddp], opt)
    if case.get("final"):
        save_model(model, case["final"])
    owned = sum(1 for n, r in opt.owners.items() if r == dp_rank)
    gathered = [None] * dist.get_world_size()
    stats = opt.structured.stats()
    dist.all_gather_object(gathered, {"owned": owned, "state_bytes": stats.get("state_bytes", 0),
                                      **{k: stats.get(k, 0) for k in ("eligible_matrices", "optimizer_steps",
                                                                      "structured_updates", "structured_updates_total")}})
    return {"losses": losses, "norms": norms, "ranks": gathered, "skipped": skipped, "loss_scales": scales}


def split_layouts(model, tp: int) -> dict:
    """Our ShardLayout of every TP-split parameter of ``model`` (name -> layout)."""
    from megatron.core import parallel_state as ps

    from ds_structopt.integrations.megatron_core.tp_layout import layout_of

    return {n: layout_of(p, n, tp, ps.get_tensor_model_parallel_rank(), gated_fc1=True)
            for n, p in model.named_parameters()}


def run_layout(case: dict) -> dict:
    """Our TP layouts against megatron's own resharding: the shards dist-checkpointing loaded at this
    TP size must be our local_view of the TP=1 tensors, and gathering them must give those back."""
    from megatron.core import parallel_state as ps

    setup(case["tp"])
    model = build_model()
    load_model(model, case["init"])
    full = torch.load(case["full"], weights_only=True)
    errors = {}
    for name, p in model.named_parameters():
        layout = split_layouts(model, case["tp"])[name]
        if layout is None:
            continue
        errors[name] = max((layout.local_view(full[name]) - p).abs().max().item(),
                           (layout.gather(p.detach(), ps.get_tensor_model_parallel_group()) - full[name]).abs().max().item())
    return {"errors": errors}


def run_synthetic(case: dict) -> dict:
    """Identical full-matrix gradients at any TP size (seeded per step and name, cut with the layouts
    checked by run_layout): isolates the optimizer from the forward pass's reduction-order noise."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from ds_structopt.integrations.megatron_core import get_megatron_structopt_optimizer, load_checkpoint, save_checkpoint

    setup(case["tp"])
    model = build_model()
    load_model(model, case["init"])
    layouts = split_layouts(model, case["tp"])
    ddp = DistributedDataParallel(model_config(False), DistributedDataParallelConfig(use_distributed_optimizer=False), model)
    opt = get_megatron_structopt_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=0.0),
                                           [ddp], case.get("optimizer", "AdaDiag++"), case.get("options", {"update_freq": 3}),
                                           tp_mode="gather")
    full_shapes = {n: (layouts[n].full_shape(p.shape) if layouts[n] else tuple(p.shape)) for n, p in model.named_parameters()}
    start = load_checkpoint(case["resume"], [ddp], opt)["iteration"] if case.get("resume") else 0
    for step in range(start, case["steps"]):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.randn(full_shapes[name], generator=torch.Generator().manual_seed(step * 1000 + i))
            p.main_grad.copy_(layouts[name].local_view(g) if layouts[name] else g)
        ok, _, _ = opt.step()
        assert ok
        if case.get("save_at") == step + 1:
            save_checkpoint(case["ckpt"], step + 1, [ddp], opt)
    if case.get("final"):
        save_model(model, case["final"])
    return {}


def run_errors(case: dict) -> dict:
    """Bad input to the builder: every mistake must be one ValueError line naming what is wrong."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from ds_structopt.integrations.megatron_core import get_megatron_structopt_optimizer

    setup(1)
    ddp = DistributedDataParallel(model_config(False), DistributedDataParallelConfig(use_distributed_optimizer=False),
                                  build_model())
    attempts = {
        "tp_mode": dict(tp_mode="rows"),
        "lr_in_options": dict(options={"lr": 1e-3}),
        "unknown_option": dict(options={"update_frq": 3}),
        "bad_value": dict(options={"update_freq": -1}),
        "unknown_optimizer": dict(optimizer="Shampoo"),
        "distributed_optimizer": dict(config=OptimizerConfig(lr=1e-3, use_distributed_optimizer=True)),
    }
    out = {}
    for key, kwargs in attempts.items():
        config = kwargs.pop("config", OptimizerConfig(lr=1e-3))
        try:
            get_megatron_structopt_optimizer(config, [ddp], **kwargs)
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    return out


def run_init(case: dict) -> dict:
    setup(1)
    torch.manual_seed(0)
    save_model(build_model(), case["path"])
    return {}


def run_dump(case: dict) -> dict:
    setup(1)
    model = build_model()
    load_model(model, case["path"])
    params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    if case.get("save"):
        torch.save(params, case["save"])
    return {"params": params}


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    dist.init_process_group("gloo")
    results = {}
    for case in spec["cases"]:
        run = {"init": run_init, "dump": run_dump, "layout": run_layout,
               "synthetic": run_synthetic, "errors": run_errors}.get(case.get("kind"), run_train)
        results[case["name"]] = run(case)
        dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, spec["out"] + ".tmp")
        os.replace(spec["out"] + ".tmp", spec["out"])
    print("WORKER-DONE", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    main(sys.argv[1])
