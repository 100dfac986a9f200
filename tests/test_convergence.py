"""Convergence smoke: every optimizer and mode solves a noisy matrix least-squares problem.

It asserts a large loss reduction for each, and prints (does not assert) how they
compare: on toys like this AdamW at its best lr often wins; the claim that matters
is the LLaMA benchmark.
"""
import math

import pytest
import torch

import ds_structopt as dso

CASES = {
    "AdamW (torch)": (lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.0)),
    "AdaDiag": (lambda p: dso.AdaDiag(p, lr=0.1, update_freq=10)),
    "AdaDiag factored": (lambda p: dso.AdaDiag(p, lr=0.1, update_freq=10, factored=True)),
    "AdaDiag++": (lambda p: dso.AdaDiagPP(p, lr=0.1, update_freq=10)),
    "AdaDiag++ reproject": (lambda p: dso.AdaDiagPP(p, lr=0.1, update_freq=10, moments="reproject")),
    "AdaDiag++ ema": (lambda p: dso.AdaDiagPP(p, lr=0.1, update_freq=10, basis="ema")),
    "AdaDiag++ ema power_qr": (lambda p: dso.AdaDiagPP(p, lr=0.1, update_freq=10, basis="ema", power_qr=True)),
    "AdaDiag++ factored": (lambda p: dso.AdaDiagPP(p, lr=0.1, update_freq=10, factored=True)),
    "AdaDiag++ factored no-momentum b2-decay": (
        lambda p: dso.AdaDiagPP(p, lr=0.1, update_freq=10, factored=True, betas=(0.0, 0.999), beta2_decay=-0.8)),
    "ASGO newton-schulz": (lambda p: dso.ASGO(p, lr=0.1, weight_decay=0.0)),
    "ASGO eigh": (lambda p: dso.ASGO(p, lr=0.1, weight_decay=0.0, root="eigh", update_freq=5)),
    "ASGO cumulative (theory)": (lambda p: dso.ASGO(p, lr=0.1, weight_decay=0.0, cumulative=True, root="eigh", update_freq=1)),
    "DASGO": (lambda p: dso.DASGO(p, lr=0.1, weight_decay=0.0)),
}
STEPS = 300


def least_squares_run(make):
    gen = torch.Generator().manual_seed(0)
    m, n, samples = 16, 24, 512
    # ill-conditioned inputs (the case preconditioners are for), in a random basis so that
    # no optimizer's coordinate system is favoured
    rotation = torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    x = (torch.randn(samples, n, generator=gen) * torch.logspace(0, -1.5, n)) @ rotation
    w_true = torch.randn(m, n, generator=gen)
    y = x @ w_true.T + 0.01 * torch.randn(samples, m, generator=gen)
    w = torch.nn.Parameter(torch.zeros(m, n))
    b = torch.nn.Parameter(torch.zeros(m))
    opt = make([w, b])
    base = [g["lr"] for g in opt.param_groups]

    def full_loss():
        with torch.no_grad():
            return ((x @ w.T + b - y) ** 2).mean().item()

    start = full_loss()
    for step in range(STEPS):
        for g, lr in zip(opt.param_groups, base):  # cosine to 0
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        idx = torch.randint(0, samples, (64,), generator=gen)
        opt.zero_grad()
        ((x[idx] @ w.T + b - y[idx]) ** 2).mean().backward()
        opt.step()
    return start, full_loss()


RESULTS = {}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_drops_by_a_large_factor(name):
    start, end = least_squares_run(CASES[name])
    RESULTS[name] = (start, end)
    print(f"{name:>42}: loss {start:.4f} -> {end:.6f} ({start / end:.0f}x)")
    assert end < start / 50


def test_print_comparison():
    if not RESULTS:
        pytest.skip("run with the parametrized cases")
    print("\nnoisy least squares, 300 steps, same lr 0.1 and cosine schedule (not a ranking):")
    for name, (start, end) in sorted(RESULTS.items(), key=lambda kv: kv[1][1]):
        print(f"  {name:>42}: final loss {end:.6f}")
