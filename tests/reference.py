"""Dense float64 re-statements of ALGORITHMS.md, one matrix at a time, written from the
formulas (no batching, no foreach, no code shared with the package). Tests compare
the optimizers against these.
"""
from __future__ import annotations

import math

import torch

f64 = torch.float64


def svd_full(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left (m x m) and right (n x n) singular bases, columns by decreasing singular value."""
    u, _, vh = torch.linalg.svd(g, full_matrices=True)
    return u, vh.T


def align(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    if old is None:
        return new
    new = new.clone()
    for j in range(new.shape[1]):
        if torch.dot(new[:, j], old[:, j]) < 0:
            new[:, j] = -new[:, j]
    return new


def inverse_sqrt(v: torch.Tensor, damping: float) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(v)
    vals = vals.clamp_min(0)
    vals = vals + damping * vals.max()
    inv = torch.where(vals > 0, vals.rsqrt(), torch.zeros_like(vals))
    return vecs @ torch.diag(inv) @ vecs.T


class RefAdaDiag:
    """AdaDiag (one side) / AdaDiag++ (two sides), Adam or Adafactor moments; basis from the
    gradient, the first moment or the EMA factors; moments kept, reprojected or reset at a refresh."""

    def __init__(self, w, *, lr, betas, eps, wd, update_freq, two_sided, factored=False, factored_eps=1e-30, clip=1.0,
                 basis="grad", basis_beta=0.95, moments="rotated", nonsquare="both"):
        self.w = w.to(f64).clone()
        self.basis, self.b3, self.moments, self.nonsquare = basis, basis_beta, moments, nonsquare
        self.t0 = 0  # the step before the moments last started (moments="reset")
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.T, self.two_sided, self.factored = update_freq, two_sided, factored
        self.eps1, self.clip = factored_eps, clip
        m, n = self.w.shape
        self.t = 0
        self.P = self.Q = None
        self.M = torch.zeros(m, n, dtype=f64)
        self.V = torch.zeros(m, n, dtype=f64)
        self.r = torch.zeros(m, dtype=f64)
        self.c = torch.zeros(n, dtype=f64)
        self.L = torch.zeros(m, m, dtype=f64)
        self.R = torch.zeros(n, n, dtype=f64)

    def step(self, g):
        g = g.to(f64)
        m, n = g.shape
        self.t += 1
        t = self.t
        self.L = self.b3 * self.L + (1 - self.b3) * g @ g.T
        self.R = self.b3 * self.R + (1 - self.b3) * g.T @ g
        if (t - 1) % self.T == 0:
            if self.basis == "grad" or (self.basis == "ema" and t == 1):
                # basis="ema" at t=1: L, R hold only g, whose paired SVD is their eigenbasis
                left, right = svd_full(g)
            elif self.basis == "momentum":  # the first moment this step will have, unrotated
                p0 = self.P if self.P is not None else torch.eye(m, dtype=f64)
                q0 = self.Q if self.Q is not None else torch.eye(n, dtype=f64)
                left, right = svd_full(self.b1 * (p0 @ self.M @ q0.T) + (1 - self.b1) * g)
            else:  # eigenvectors of the EMA factors, by decreasing eigenvalue
                left = torch.linalg.eigh(self.L)[1].flip(-1)
                right = torch.linalg.eigh(self.R)[1].flip(-1)
            both = self.two_sided and (m == n or self.nonsquare == "both")
            use_left = both or m <= n
            use_right = both or m > n
            old_p, old_q = self.P, self.Q
            self.P = align(left, self.P) if use_left else None
            self.Q = align(right, self.Q) if use_right else None
            a = self.P.T @ old_p if old_p is not None else None  # old rotated coordinates -> new
            b = old_q.T @ self.Q if old_q is not None else None
            if self.moments in ("reproject", "reproject_both"):
                if a is not None:
                    self.M = a @ self.M
                if b is not None:
                    self.M = self.M @ b
            if self.moments == "reproject_both":  # diagonal of the rotated diagonal covariance
                if a is not None:
                    self.V, self.r = (a * a) @ self.V, (a * a) @ self.r
                if b is not None:
                    self.V, self.c = self.V @ (b * b), (b * b).T @ self.c
            if self.moments == "reset" and t > 1:
                self.M, self.V = torch.zeros_like(self.M), torch.zeros_like(self.V)
                self.r, self.c = torch.zeros_like(self.r), torch.zeros_like(self.c)
                self.t0 = t - 1
        P = self.P if self.P is not None else torch.eye(m, dtype=f64)
        Q = self.Q if self.Q is not None else torch.eye(n, dtype=f64)
        gt = P.T @ g @ Q
        # Entries that are exactly zero in exact arithmetic (e.g. null-space columns) carry
        # ~1e-16 round-off here; Adam/Adafactor normalization would magnify it, so zero it.
        gt = torch.where(gt.abs() < 1e-12 * gt.abs().max(), torch.zeros_like(gt), gt)
        self.M = self.b1 * self.M + (1 - self.b1) * gt
        t = t - self.t0  # steps the moments have averaged (bias correction)
        mh = self.M / (1 - self.b1**t)
        if self.factored:
            sq = gt * gt + self.eps1
            self.r = self.b2 * self.r + (1 - self.b2) * sq.mean(dim=1)
            self.c = self.b2 * self.c + (1 - self.b2) * sq.mean(dim=0)
            vh = torch.outer(self.r, self.c) / self.r.mean() / (1 - self.b2**t)
            d = (mh if self.b1 > 0 else gt) / vh.sqrt()
            rms = math.sqrt(float((d * d).mean()))
            d = d / max(1.0, rms / self.clip)
        else:
            self.V = self.b2 * self.V + (1 - self.b2) * gt * gt
            vh = self.V / (1 - self.b2**t)
            d = mh / (vh.sqrt() + self.eps)
        u = P @ d @ Q.T
        self.w = self.w - self.lr * (u + self.wd * self.w)
        return self.w


class RefASGO:
    """ASGO with the exact (eigh) inverse root recomputed every step."""

    def __init__(self, w, *, lr, betas, wd, damping, rms_scale=0.2, cumulative=False):
        self.w = w.to(f64).clone()
        self.lr, (self.b1, self.b2), self.wd, self.damping = lr, betas, wd, damping
        self.rms, self.cumulative = rms_scale, cumulative
        m, n = self.w.shape
        self.left = m < n
        d = m if self.left else n
        self.M = torch.zeros(m, n, dtype=f64)
        self.V = torch.zeros(d, d, dtype=f64)

    def step(self, g):
        g = g.to(f64)
        self.M = self.b1 * self.M + (1 - self.b1) * g
        gram = g @ g.T if self.left else g.T @ g
        self.V = self.V + gram if self.cumulative else self.b2 * self.V + (1 - self.b2) * gram
        root = inverse_sqrt(self.V, self.damping)
        u = root @ self.M if self.left else self.M @ root
        if self.rms is not None:
            u = u * (self.rms * math.sqrt(u.numel()) / torch.linalg.norm(u))
        self.w = self.w * (1 - self.lr * self.wd) - self.lr * u
        return self.w


class RefDASGO:
    def __init__(self, w, *, lr, betas, wd, eps=1e-8, rms_scale=0.2):
        self.w = w.to(f64).clone()
        self.lr, (self.b1, self.b2), self.wd, self.eps, self.rms = lr, betas, wd, eps, rms_scale
        m, n = self.w.shape
        self.M = torch.zeros(m, n, dtype=f64)
        self.v = torch.zeros(n, dtype=f64)

    def step(self, g):
        g = g.to(f64)
        self.M = self.b1 * self.M + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * (g * g).sum(dim=0)
        u = self.M / (self.v + self.eps).sqrt()
        if self.rms is not None:
            u = u * (self.rms * math.sqrt(u.numel()) / torch.linalg.norm(u))
        self.w = self.w * (1 - self.lr * self.wd) - self.lr * u
        return self.w
