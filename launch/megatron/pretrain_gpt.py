#!/usr/bin/env python
"""Pretrain a megatron-core GPTModel (LLaMA-style: RMSNorm, SwiGLU, RoPE, GQA) with a ds_structopt optimizer.

Megatron's own pieces do the work: parallel_state (TP x DP), DistributedDataParallel,
Float16Module for bf16, the no-pipelining forward/backward schedule with gradient
accumulation, OptimizerParamScheduler (warmup + cosine) and clip_grad; ours is the
optimizer (``get_megatron_structopt_optimizer``) and its DP-resizable checkpoints.

    torchrun --nproc_per_node 8 launch/megatron/pretrain_gpt.py --tp 2 --bf16 \\
        --num-layers 12 --hidden 768 --heads 12 --seq-len 1024 --micro-batch 8 --global-batch 256 \\
        --optimizer AdaDiag++ --options '{"update_freq": 100}' --save ckpt/ --save-interval 500

Data: the bundled text (byte tokens) unless ``--data`` names .txt/.jsonl/.parquet files.
megatron-core needs CUDA; on a CPU-only machine the tests run this script with their shim.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (DP = world / TP)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--query-groups", type=int, default=None, help="GQA groups (default: heads)")
    p.add_argument("--ffn-hidden", type=int, default=None, help="default: 8/3 x hidden, rounded to 64")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--optimizer", default="AdaDiag++")
    p.add_argument("--options", default='{"update_freq": 20}', help="JSON of our optimizer's options (not lr/wd)")
    p.add_argument("--tp-mode", default="gather", choices=["gather", "local"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--data", nargs="*", default=None, help="text files (default: the bundled text)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: bytes)")
    p.add_argument("--save", default=None, help="checkpoint directory")
    p.add_argument("--save-interval", type=int, default=0)
    p.add_argument("--load", default=None, help="resume from this checkpoint directory (any DP size)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="write result.json here")
    args = p.parse_args(argv)
    try:
        args.options = json.loads(args.options)
    except json.JSONDecodeError as e:
        p.error(f"--options is not JSON: {e}")
    return args


def build_model(args, vocab: int):
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    ffn = args.ffn_hidden or 64 * math.ceil(8 * args.hidden / 3 / 64)
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.query_groups, ffn_hidden_size=ffn, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available())
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=vocab, max_sequence_length=args.seq_len, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    return config, model


def main(argv=None) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from ds_structopt.data.packing import pack
    from ds_structopt.data.sources import embedded_documents, iter_documents
    from ds_structopt.data.tokenizer import load_tokenizer
    from ds_structopt.integrations.megatron_core import get_megatron_structopt_optimizer, load_checkpoint, save_checkpoint

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    if world % args.tp:
        raise SystemExit(f"error: --tp {args.tp} does not divide the world size {world}")
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if args.global_batch % (args.micro_batch * dp):
        raise SystemExit(f"error: --global-batch {args.global_batch} is not a multiple of micro-batch x DP "
                         f"({args.micro_batch} x {dp})")
    accumulation = args.global_batch // (args.micro_batch * dp)

    tokenizer = load_tokenizer(args.tokenizer)
    docs = iter_documents(args.data) if args.data else embedded_documents()
    data = pack(docs, tokenizer, args.seq_len)
    vocab = 128 * args.tp * math.ceil(data.vocab_size / (128 * args.tp))  # megatron pads the vocabulary
    config, model = build_model(args, vocab)
    if cuda:
        model.cuda()
    module = Float16Module(config, model) if args.bf16 else model
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=False,
                                                                        grad_reduce_in_fp32=True), module)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    opt_config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                                 clip_grad=args.clip_grad, bf16=args.bf16, adam_beta1=0.9, adam_beta2=0.95)
    optimizer = get_megatron_structopt_optimizer(opt_config, [ddp], args.optimizer, args.options, tp_mode=args.tp_mode)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
                                        lr_warmup_steps=args.warmup, lr_decay_steps=args.steps, lr_decay_style="cosine",
                                        start_wd=args.weight_decay, end_wd=args.weight_decay,
                                        wd_incr_steps=args.steps, wd_incr_style="constant")
    start = 0
    if args.load:
        common = load_checkpoint(args.load, [ddp], optimizer)
        start = common["iteration"]
        scheduler.load_state_dict(common["extra"]["scheduler"])

    device = torch.device("cuda") if cuda else torch.device("cpu")
    mask = torch.triu(torch.ones(args.seq_len, args.seq_len, dtype=torch.bool, device=device), 1)[None, None]
    positions = torch.arange(args.seq_len, device=device)[None].expand(args.micro_batch, -1)

    def batches(step: int):
        """This DP rank's micro-batches of global step ``step`` (same global batch at any DP size)."""
        rows = torch.arange(step * args.global_batch, (step + 1) * args.global_batch) % len(data.train)
        mine = rows[dp_rank * args.micro_batch * accumulation:(dp_rank + 1) * args.micro_batch * accumulation]
        for chunk in mine.split(args.micro_batch):
            yield data.train[chunk].long().to(device)

    def forward_step(iterator, model):
        tokens = next(iterator)
        losses = model(tokens[:, :-1], positions, mask, labels=tokens[:, 1:])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # megatron scales the loss in place
        return losses, loss_func

    forward_backward = get_forward_backward_func()
    history, begin = [], time.time()
    for step in range(start, args.steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        stats = forward_backward(forward_step_func=forward_step, data_iterator=batches(step), model=[ddp],
                                 num_microbatches=accumulation, seq_length=args.seq_len,
                                 micro_batch_size=args.micro_batch, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        loss = torch.stack([s["loss"] for s in stats]).mean()
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        history.append({"step": step + 1, "loss": loss.item() / dp, "grad_norm": float(grad_norm or 0.0),
                        "lr": optimizer.param_groups[0]["lr"], "skipped": not ok})
        if dist.get_rank() == 0 and ((step + 1) % args.log_interval == 0 or step + 1 == args.steps):
            h = history[-1]
            print(f"step {h['step']:5d} | loss {h['loss']:.4f} | grad norm {h['grad_norm']:.3f} | lr {h['lr']:.2e}",
                  flush=True)
        if args.save and args.save_interval and (step + 1) % args.save_interval == 0:
            save_checkpoint(args.save, step + 1, [ddp], optimizer, extra={"scheduler": scheduler.state_dict()})
    elapsed = time.time() - begin
    tokens = (args.steps - start) * args.global_batch * args.seq_len
    result = {"world": world, "tp": args.tp, "dp": dp, "optimizer": args.optimizer, "steps": args.steps,
              "start": start, "history": history, "tokens_per_s": tokens / max(elapsed, 1e-9)}
    if dist.get_rank() == 0:
        print(f"done: {tokens} tokens in {elapsed:.1f} s ({result['tokens_per_s']:.0f} tok/s)", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
