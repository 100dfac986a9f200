"""Step suite: optimizer-step and whole training-step time vs AdamW, memory and state bytes, at LLaMA shapes.

For each model size (real ``LlamaForCausalLM`` of the GaLore/AdaDiag C4 shapes,
no download) one process builds the model, runs forward+backward at the given
batch (micro-batches with accumulation, as a trainer would) and then, on those
gradients, times every optimizer: the first step (state allocation), plain
steps (median) and a step where every matrix refreshes its basis, reported
separately; "window" = ((T-1) plain + refresh) / T. Whole step = fwd+bwd +
optimizer step, both measured in this process. Peak extra memory = the highest
resident (CPU) or allocated (CUDA) memory during the optimizer's steps minus
what was in use before it was built.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..tables import markdown_table
from . import optimizers as contenders
from . import report

MODELS = ("60m", "130m", "350m", "1b")


class PeakMemory:
    """Highest memory in use while the block runs: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else self.rss()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def set_update_freq(opt: contenders.PairedOptimizer, value: int) -> bool:
    """Force (1) or suppress (huge) basis refreshes; False if the optimizer has no refresh period."""
    found = False
    for g in opt.matrix_part().param_groups:
        for key in ("update_freq", "precondition_frequency"):
            if key in g:
                g[key], found = value, True
    return found


def forward_backward(model: torch.nn.Module, batch: int, micro: int, seq_len: int, device: torch.device) -> float:
    """Seconds for fwd+bwd over ``batch`` sequences in micro-batches (gradients accumulate, as in training)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = torch.randint(0, vocab, (micro, seq_len + 1), generator=gen).to(device)
    model.zero_grad(set_to_none=True)
    model(input_ids=rows[:, :-1], labels=rows[:, 1:]).loss.backward()  # warm-up micro-batch
    model.zero_grad(set_to_none=True)

    def run() -> None:
        for _ in range(max(1, batch // micro)):
            model(input_ids=rows[:, :-1], labels=rows[:, 1:]).loss.backward()
    return timed(run, device)


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS so the next optimizer's RSS peak starts from a clean floor."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: peaks may then include memory reused from the previous optimizer
        pass


def measure_optimizer(name: str, model: torch.nn.Module, update_freq: int, plain_steps: int,
                      device: torch.device) -> dict[str, Any]:
    grads = {p: p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
    release_freed_memory()
    meter = PeakMemory(device)
    before = meter.current()
    with meter:
        opt = contenders.build(name, model, update_freq=update_freq)
        first = timed(opt.step, device)                 # allocates state (and refreshes every basis)
        has_refresh = set_update_freq(opt, 10**9)
        plain = sorted(timed(opt.step, device) for _ in range(plain_steps))
        plain_s = plain[len(plain) // 2]
        if has_refresh:
            set_update_freq(opt, 1)
            refresh_s = timed(opt.step, device)
        else:
            refresh_s = plain_s
    for p, g in grads.items():  # the steps above changed the weights, not the gradients; keep it that way
        p.grad = g
    matrices, _ = contenders.split_params(model)
    n_all, n_mat = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in matrices)
    state = opt.state_bytes()
    del opt
    release_freed_memory()
    return {"first_s": first, "plain_s": plain_s, "refresh_s": refresh_s, "has_refresh": has_refresh,
            "window_s": ((update_freq - 1) * plain_s + refresh_s) / update_freq,
            "state_bytes_per_param": state / n_all, "peak_extra_bytes": meter.peak - before,
            "params": n_all, "matrix_params": n_mat}


def memory_needed(params: int) -> int:
    """Rough upper bound: weights + grads + the largest state (SOAP, ~30 B/param) + workspace."""
    return params * (4 + 4 + 30 + 8)


def run_model(size: str, names: Sequence[str], *, whole: bool, batch: int, micro: int, seq_len: int,
              update_freq: int, plain_steps: int, device: torch.device, dtype: torch.dtype,
              log: Any = None) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from ..training.models import model_config

    log = log or (lambda msg: print(msg, flush=True))
    torch.manual_seed(0)
    cfg = model_config(size, 32000, seq_len)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"model": size, "params": params, "batch": batch, "micro_batch": micro, "seq_len": seq_len,
                           "update_freq": update_freq, "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    if whole:
        out["fwd_bwd_s"] = forward_backward(model, batch, micro, seq_len, device)
        log(f"[step] {size}: fwd+bwd {batch}x{seq_len} tokens {out['fwd_bwd_s']:.2f} s")
    else:
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    results = {}
    for name in names:
        r = measure_optimizer(name, model, update_freq, plain_steps, device)
        if whole:
            r["whole_plain_s"] = out["fwd_bwd_s"] + r["plain_s"]
            r["whole_window_s"] = out["fwd_bwd_s"] + r["window_s"]
        results[name] = r
        log(f"[step] {size} {name:>18}: plain {r['plain_s']:.3f} s, refresh {r['refresh_s']:.3f} s, "
            f"state {r['state_bytes_per_param']:.2f} B/param, peak +{r['peak_extra_bytes'] / 2**20:.0f} MiB")
    base = results.get("AdamW")
    if base:
        for r in results.values():
            r["plain_ratio"] = r["plain_s"] / base["plain_s"]
            r["window_ratio"] = r["window_s"] / base["plain_s"]
            if whole:
                r["whole_window_ratio"] = r["whole_window_s"] / base["whole_plain_s"]
    out["results"] = results
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["60m", "130m", "350m", "1b"], help=f"sizes from {MODELS}")
    p.add_argument("--whole-step-models", nargs="+", default=["130m"], help="sizes that also get fwd+bwd timed")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--update-freq", type=int, default=200)
    p.add_argument("--plain-steps", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (run this suite on a GPU machine)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = contenders.names(args.optimizers)
    models, whole = list(args.models), set(args.whole_step_models)
    batch, micro, seq_len, plain_steps = args.batch, args.micro_batch, args.seq_len, args.plain_steps
    if args.quick:
        models, whole, batch, micro, seq_len, plain_steps = ["tiny"], {"tiny"}, 4, 4, 64, 1
    runs, skipped = [], {}
    for size in models:
        from transformers import LlamaForCausalLM  # noqa: F401  (import cost outside the timings)

        from ..training.models import model_config

        cfg = model_config(size, 32000, seq_len)
        approx = cfg.vocab_size * cfg.hidden_size * 2 + cfg.num_hidden_layers * (
            4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size)
        need, have = memory_needed(approx), _available_memory(device)
        if need > have:
            skipped[size] = f"needs ~{need / 2**30:.0f} GiB for {approx / 1e9:.2f}B params, {args.device} has {have / 2**30:.0f} GiB"
            print(f"[step] skip {size}: {skipped[size]}")
            continue
        runs.append(run_model(size, names, whole=size in whole, batch=batch, micro=micro, seq_len=seq_len,
                              update_freq=args.update_freq, plain_steps=plain_steps, device=device, dtype=dtype))
    return write(args.out, runs, skipped)


def write(out_dir: str | Path, runs: list[dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ""
    plots = []
    for run in runs:
        res = run["results"]
        whole = "fwd_bwd_s" in run
        md += (f"\n### {run['model']} ({run['params'] / 1e6:.1f}M params, {run['dtype']} on {run['device']}, "
               f"T = {run['update_freq']})\n\n")
        if whole:
            md += (f"fwd+bwd of {run['batch']} x {run['seq_len']} tokens (micro-batch {run['micro_batch']}): "
                   f"{run['fwd_bwd_s']:.2f} s\n\n")
        headers = ["optimizer", "plain step s", "refresh step s", "plain / AdamW", "window / AdamW"]
        headers += ["whole step (window) / AdamW"] if whole else []
        headers += ["state B/param", "peak extra MiB"]
        rows = []
        for name, r in res.items():
            row = [name, r["plain_s"], r["refresh_s"] if r["has_refresh"] else "no refresh", r.get("plain_ratio"),
                   r.get("window_ratio")]
            row += [r.get("whole_window_ratio")] if whole else []
            row += [r["state_bytes_per_param"], r["peak_extra_bytes"] / 2**20]
            rows.append(row)
        md += markdown_table(headers, rows)
        key = "whole_window_ratio" if whole else "window_ratio"
        if all(key in r for r in res.values()):
            plots.append(report.bar_plot(out / f"step_{run['model']}.png", list(res), [r[key] for r in res.values()],
                                         "time / AdamW", f"{run['model']}: {'whole training' if whole else 'optimizer'}"
                                         " step over a refresh window, relative to AdamW", reference=1.0))
    for size, why in skipped.items():
        md += f"\n{size}: skipped ({why})\n"
    files = report.write(out, "step", {"runs": runs, "skipped": skipped, "plots": plots}, md)
    return {"files": files, "plots": plots}
