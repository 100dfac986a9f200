"""Why ASGO's Newton-Schulz root keeps its coupled form (issue 18, transients).

An ASGO owner of one square matrix holds four d x d buffers while the coupled iteration runs
(Y, Z, T and a spare; the gathered gradient serves as one), against a state of 2 d^2: 2.0x.
The uncoupled form would need two: it never keeps Y, recomputing X = Z (V/s) Z (= Z Y in exact
arithmetic) in row blocks every iteration, and updates Z <- Z T in place in row blocks, with the
same four products per iteration. This script runs both on the same matrices in fp32, with the
same Polar Express coefficients, scale and damping, and prints each one's relative error to the
exact root (fp64 eigh):

    .venv/bin/python scripts/newton_schulz_forms.py

Measured 2026-12-07 (commit in docs/benchmarks.md): the coupled form is within 1e-6..7e-3 on
every matrix; the uncoupled one diverges (errors 1e13..1e28, or NaN) on the full-rank and the
low-rank Gram matrices and is 100-2700x less accurate (1e-4..2e-3 against ~1e-6) on the EMA ones. Round-off in
Z V Z grows with ||Z||^2 ~ 1/lambda_min, which the coupled form never forms.
"""
from __future__ import annotations

import torch

from ds_structopt.optim.linalg import POLAR_EXPRESS, _add_to_diagonal, newton_schulz_inverse_root


def uncoupled_inverse_root(stack: torch.Tensor, iterations: int, eps: float, damping: float,
                           rows: int) -> torch.Tensor:
    """The two-buffer form: Z and X only, products in blocks of ``rows`` rows."""
    k, d, _ = stack.shape
    delta = damping * torch.linalg.matrix_norm(stack)
    shifted = stack.clone()
    _add_to_diagonal(shifted, delta + eps)
    scale = 1.01 * torch.linalg.matrix_norm(shifted)
    inv_scale = (1.0 / scale).view(k, 1, 1)
    z = torch.zeros_like(stack)
    _add_to_diagonal(z, 1.0)
    x = torch.empty_like(stack)
    for i in range(iterations):
        a, b, c = POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)]
        for r in range(0, d, rows):  # X = Z (V + delta I) Z / s
            zb = z[:, r:r + rows]
            t = torch.bmm(zb, stack).addcmul_(zb, delta.view(k, 1, 1)).mul_(inv_scale)
            x[:, r:r + rows] = torch.bmm(t, z)
        for r in range(0, d, rows):  # Z <- Z (a I + b X + c X^2), each row block in place
            zb = z[:, r:r + rows]
            w1 = torch.bmm(zb, x)
            w2 = torch.bmm(w1, x)
            zb.mul_(a).add_(w1, alpha=b).add_(w2, alpha=c)
    return z / scale.sqrt().view(k, 1, 1)


def exact_inverse_root(v: torch.Tensor, damping: float) -> torch.Tensor:
    v64 = v.double()
    lam, q = torch.linalg.eigh(v64)
    lam = lam.clamp_min(0) + damping * torch.linalg.matrix_norm(v64).view(-1, 1)
    return (q * lam.rsqrt().unsqueeze(-2)) @ q.mT


def relative_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(a.double() - exact) / torch.linalg.matrix_norm(exact)).max().item()


def matrices(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for d in (64, 256, 512):
        g = torch.randn(d, 2 * d, generator=gen) * torch.logspace(0, -3, 2 * d)
        out[f"full-rank Gram, d={d}"] = g @ g.T
        g = torch.randn(d, 8, generator=gen) @ torch.randn(8, 4 * d, generator=gen)
        out[f"rank-8 Gram, d={d}"] = g @ g.T
        v = torch.zeros(d, d)
        for _ in range(20):
            g = torch.randn(d, d // 2, generator=gen) * torch.logspace(0, -2, d // 2)
            v.lerp_(g @ g.T, 0.2)
        out[f"EMA of 20 Grams, d={d}"] = v
    return out


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"{'matrix':24s} {'damping':>8s} {'coupled':>10s} {'uncoupled':>10s}")
    for name, v in matrices(gen).items():
        for damping in (1e-6, 1e-5):
            exact = exact_inverse_root(v.unsqueeze(0), damping)
            coupled, _ = newton_schulz_inverse_root(v.unsqueeze(0), 10, 1e-10, damping)
            two = uncoupled_inverse_root(v.unsqueeze(0), 10, 1e-10, damping, rows=max(1, v.shape[0] // 8))
            print(f"{name:24s} {damping:8.0e} {relative_error(coupled, exact):10.2e} {relative_error(two, exact):10.2e}")


if __name__ == "__main__":
    main()
