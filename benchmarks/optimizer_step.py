"""Optimizer-step time relative to torch AdamW on LLaMA-shaped parameters, and state bytes/param.

Builds the parameter set of a LLaMA model of the GaLore/AdaDiag C4 sizes (q/k/v/o
h x h, gate/up i x h, down h x i, RMSNorm vectors, untied embeddings and LM head
of a 32000 vocabulary), fills fixed random gradients and times ``opt.step()``.
Plain steps and basis-refresh steps are reported separately; the "window" column
averages them over one refresh window of T = update_freq steps.
Every optimizer gets the same parameters and the same name-based split
(matrices structured, embeddings/head/norms AdamW).

    python benchmarks/optimizer_step.py --model 130m --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import torch
from torch import nn

import ds_structopt as dso

# hidden, intermediate, layers (vocab 32000), as in the LLaMA-on-C4 setup of GaLore/AdaDiag.
LLAMA_SHAPES = {
    "60m": (512, 1376, 8),
    "130m": (768, 2048, 12),
    "350m": (1024, 2736, 24),
    "1b": (2048, 5461, 24),
}
VOCAB = 32000


class LlamaShapedParams(nn.Module):
    """Parameters only (no forward): the optimizer sees exactly a LLaMA's tensors and names."""

    def __init__(self, hidden: int, inter: int, layers: int, vocab: int = VOCAB):
        super().__init__()
        self.embed_tokens = nn.Parameter(torch.empty(vocab, hidden))
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.self_attn = nn.ModuleDict({k: nn.Linear(hidden, hidden, bias=False) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
            block.mlp = nn.ModuleDict({
                "gate_proj": nn.Linear(hidden, inter, bias=False),
                "up_proj": nn.Linear(hidden, inter, bias=False),
                "down_proj": nn.Linear(inter, hidden, bias=False),
            })
            block.input_layernorm = nn.Parameter(torch.ones(hidden))
            block.post_attention_layernorm = nn.Parameter(torch.ones(hidden))
            self.layers.append(block)
        self.norm = nn.Parameter(torch.ones(hidden))
        self.lm_head = nn.Parameter(torch.empty(vocab, hidden))
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], int], torch.optim.Optimizer]] = {
    "AdamW (torch)": lambda groups, T: torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-3, foreach=True),
    "AdaDiag": lambda groups, T: dso.AdaDiag(groups, lr=1e-3, update_freq=T),
    "AdaDiag++": lambda groups, T: dso.AdaDiagPP(groups, lr=1e-3, update_freq=T),
    "AdaDiag++ factored": lambda groups, T: dso.AdaDiagPP(groups, lr=1e-3, update_freq=T, factored=True),
    "AdaDiag++ factored b1=0": lambda groups, T: dso.AdaDiagPP(groups, lr=1e-3, update_freq=T, factored=True, betas=(0.0, 0.999)),
    "AdaDiag++ ema": lambda groups, T: dso.AdaDiagPP(groups, lr=1e-3, update_freq=T, basis="ema"),
    "ASGO (Newton-Schulz)": lambda groups, T: dso.ASGO(groups, update_freq=T),
    "ASGO (eigh, T)": lambda groups, T: dso.ASGO(groups, update_freq=T, root="eigh"),
    "DASGO": lambda groups, T: dso.DASGO(groups),
}


def time_steps(opt: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - start)
    return out


def set_option(opt: torch.optim.Optimizer, key: str, value: Any) -> None:
    for g in opt.param_groups:
        if key in g:
            g[key] = value


def measure(name: str, model: nn.Module, update_freq: int, plain_steps: int) -> dict[str, float]:
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = OPTIMIZERS[name](dso.param_groups(model), update_freq)
    first = time_steps(opt, 1)[0]              # allocates state (and refreshes every basis)
    set_option(opt, "update_freq", 10**9)      # no refresh: plain steps
    plain = sorted(time_steps(opt, plain_steps))
    plain_mean = plain[len(plain) // 2]
    set_option(opt, "update_freq", 1)          # (t - 1) % 1 == 0: a refresh on every matrix
    refresh = time_steps(opt, 1)[0] if any("update_freq" in g for g in opt.param_groups) else plain_mean
    groups = dso.param_groups(model)
    matrices = {p for g in groups if g["structured"] for p in g["params"]}
    numel = sum(p.numel() for p in model.parameters())
    matrix_numel = sum(p.numel() for p in matrices)
    state = {p: sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor)) for p, s in opt.state.items()}
    return {
        "first_step_s": first,
        "plain_s": plain_mean,
        "refresh_s": refresh,
        "window_s": ((update_freq - 1) * plain_mean + refresh) / update_freq,
        "state_bytes_per_param": sum(state.values()) / numel,
        "matrix_state_bytes_per_param": sum(b for p, b in state.items() if p in matrices) / matrix_numel,
        "params": numel,
        "matrix_params": matrix_numel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(LLAMA_SHAPES), default="130m")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (ratios do not depend on it)")
    parser.add_argument("--update-freq", type=int, default=200)
    parser.add_argument("--plain-steps", type=int, default=3)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    hidden, inter, layers = LLAMA_SHAPES[args.model]
    layers = args.layers or layers
    torch.manual_seed(0)
    model = LlamaShapedParams(hidden, inter, layers)
    results = {}
    for name in args.optimizers:
        results[name] = measure(name, model, args.update_freq, args.plain_steps)
        r = results[name]
        print(f"{name:>22}: plain {r['plain_s']:.3f}s  refresh {r['refresh_s']:.3f}s  state {r['state_bytes_per_param']:.2f} B/param", flush=True)
        for p in model.parameters():
            p.grad = None

    base = results.get("AdamW (torch)")
    print(f"\nLLaMA-{args.model} shapes ({layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"T={args.update_freq}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| optimizer | plain step (s) | refresh step (s) | plain / AdamW | window avg / AdamW | state B/param (all) | state B/param (matrices) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = (r["plain_s"] / base["plain_s"]) if base else float("nan")
        wratio = (r["window_s"] / base["plain_s"]) if base else float("nan")
        print(f"| {name} | {r['plain_s']:.3f} | {r['refresh_s']:.3f} | {ratio:.1f}x | {wratio:.1f}x | {r['state_bytes_per_param']:.2f} | {r['matrix_state_bytes_per_param']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "layers": layers, "update_freq": args.update_freq, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
