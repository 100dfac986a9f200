"""Single-process comparison: a tiny LLaMA trained on Python's bundled docs with AdaDiag++ and AdamW.

Same model init, data order, schedule and parameter split for both; prints the
training loss as it goes and the held-out loss of each optimizer at the end.
Usage: ``python -m ds_structopt.demo [--steps N] [--optimizers AdaDiag++ AdamW ...]``
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any, Optional, Sequence

import torch

import ds_structopt as dso
from ds_structopt.data.packing import pack
from ds_structopt.data.sampler import ShardedBatchSampler
from ds_structopt.data.sources import iter_documents
from ds_structopt.data.tokenizer import ByteTokenizer
from ds_structopt.training.local import evaluate, lm_step
from ds_structopt.training.schedule import warmup_cosine

# Each optimizer at (about) its best lr for this model, from a 300-step sweep over
# {1e-3, 2e-3, 3e-3, 6e-3} (see the closing note of the core-optimizers issue).
DEFAULT_LR = {"AdamW": 1e-3, "AdaDiag": 3e-3, "AdaDiag++": 3e-3, "ASGO": 1e-2, "DASGO": 1e-2}


def tiny_llama(seed: int, seq_len: int, vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float, update_freq: int) -> torch.optim.Optimizer:
    """``name``: AdamW, a config name (AdaDiag++, ...), or a config name + "-factored" (Adafactor mode)."""
    groups = dso.param_groups(model, weight_decay=weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(
            [{"params": g["params"], "weight_decay": g.get("weight_decay", weight_decay)} for g in groups],
            lr=lr,
            betas=(0.9, 0.999),
        )
    base, factored = (name[: -len("-factored")], True) if name.endswith("-factored") else (name, False)
    cls = dso.get_optimizer_class(base)
    opts: dict[str, Any] = {"lr": lr}
    if "update_freq" in cls.DEFAULTS:
        opts["update_freq"] = update_freq
    if factored:
        opts["factored"] = True
    return cls(groups, **opts)


def train_one(name: str, args: argparse.Namespace, data: Any, eval_rows: torch.Tensor) -> dict[str, float]:
    model = tiny_llama(args.seed, args.seq_len, data.vocab_size)
    base = name.replace("-factored", "")
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(base) or dso.get_optimizer_class(base).DEFAULTS["lr"]
    opt = make_optimizer(name, model, lr, args.weight_decay, args.update_freq)
    base_lrs = [g["lr"] for g in opt.param_groups]
    sampler = ShardedBatchSampler(len(data.train), args.batch_size, seed=args.seed)  # same batches for everyone
    start = time.perf_counter()
    for step in range(args.steps):
        scale = warmup_cosine(step, args.steps, max(1, args.steps // 10))
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * scale
        loss = lm_step(model, opt, data.train[sampler.next_indices()].long())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"[{name:>10}] step {step:4d}  train loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start
    return {"eval_loss": evaluate(model, eval_rows, args.batch_size), "seconds": seconds, "lr": lr}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizers", nargs="+", default=["AdaDiag++", "AdamW"])
    parser.add_argument("--lr", type=float, default=None, help="one lr for all; default: each optimizer's own (AdamW 1e-3, AdaDiag* 3e-3, ASGO/DASGO 1e-2)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--update-freq", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = pack(iter_documents(["embedded"]), ByteTokenizer(), args.seq_len)
    eval_rows = data.eval[: 8 * args.batch_size]
    print(f"corpus: {len(data.train)} train / {len(data.eval)} held-out rows of {args.seq_len} byte tokens "
          "(pydoc topics + stdlib docstrings)")
    results = {name: train_one(name, args, data, eval_rows) for name in args.optimizers}
    print("\nheld-out loss after", args.steps, "steps:")
    for name, r in results.items():
        print(f"  {name:>18}: eval loss {r['eval_loss']:.4f}  (ppl {math.exp(r['eval_loss']):.2f}, lr {r['lr']:g}, {r['seconds']:.1f} s)")
    return results


if __name__ == "__main__":
    main()
