"""Batched, failure-tolerant matrix decompositions used by the structured optimizers.

Every function takes a stack of fp32 matrices shaped (k, a, b) and works on the
whole stack in one call. A decomposition that raises or returns non-finite
values is retried for that matrix alone in fp64; whatever still fails comes
back as ``None`` so the caller can keep its previous basis and count the
failure. Nothing here knows about optimizer state or DeepSpeed.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

# The raw LAPACK-backed calls, kept as module attributes so fault-injection
# tests (and later the fault-tolerance suite) can replace them.
_svd = torch.linalg.svd
_eigh = torch.linalg.eigh
_qr = torch.linalg.qr

# Polar Express degree-5 coefficients (Amsel et al. 2025, arXiv 2505.16932,
# Algorithm 1), with the paper's 1.01 safety factor on all but the last triple.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_SAFETY = 1.01
POLAR_EXPRESS = tuple(
    (a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)


def _item_ok(*outs: Tensor) -> list[bool]:
    """Per-matrix finiteness of a batched result (one host sync for the stack)."""
    flags = None
    for out in outs:
        f = torch.isfinite(out.flatten(1)).all(dim=1)
        flags = f if flags is None else flags & f
    return flags.tolist()


def _robust(fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> list[Optional[tuple[Tensor, ...]]]:
    """Run ``fn`` on whole stacks; retry failing items one by one in fp64."""
    count, dtype = inputs[0].shape[0], inputs[0].dtype
    results: list[Optional[tuple[Tensor, ...]]] = [None] * count
    try:
        outs = fn(*inputs)
        ok = _item_ok(*outs)
    except RuntimeError:
        outs, ok = None, [False] * count
    for i, good in enumerate(ok):
        if good:
            results[i] = tuple(o[i] for o in outs)
            continue
        try:
            retry = fn(*(x[i : i + 1].double() for x in inputs))
        except RuntimeError:
            continue
        if all(_item_ok(*retry)):
            results[i] = tuple(o[0].to(dtype) for o in retry)
    return results


def svd_bases(stack: Tensor, left: bool, right: bool) -> list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]]:
    """Orthogonal bases from the SVD of each gradient: P (m x m) and/or Q (n x n).

    Singular vectors come sorted by decreasing singular value. Full matrices are
    only requested when a wanted side is the larger one (its null-space
    completion is then arbitrary, as the algorithm allows).
    """
    m, n = stack.shape[-2:]
    full = (left and m > n) or (right and n > m)

    def fn(x: Tensor) -> tuple[Tensor, ...]:
        u, _, vh = _svd(x, full_matrices=full)
        return u, vh

    out: list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]] = []
    for res in _robust(fn, stack):
        if res is None:
            out.append(None)
            continue
        u, vh = res
        out.append((u if left else None, vh.mT.contiguous() if right else None))
    return out


def eigen_bases(stack: Tensor) -> list[Optional[Tensor]]:
    """Eigenvectors of symmetric PSD factors, columns by decreasing eigenvalue."""

    def fn(x: Tensor) -> tuple[Tensor, ...]:
        _, vecs = _eigh(x)
        return (vecs.flip(-1),)

    return [None if r is None else r[0].contiguous() for r in _robust(fn, stack)]


def power_qr_bases(factors: Tensor, previous: Tensor) -> list[Optional[Tensor]]:
    """One warm-started power step + QR (as SOAP does) instead of a full eigh.

    Column signs follow R's diagonal so each column stays close to the
    previous one and the rotated moments keep their meaning.
    """
    def fn(x: Tensor, prev: Tensor) -> tuple[Tensor, ...]:
        q, r = _qr(torch.bmm(x, prev))
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (q * sign.unsqueeze(-2),)

    return [None if r is None else r[0].contiguous() for r in _robust(fn, factors, previous)]


def align_signs(new: Tensor, old: Tensor) -> Tensor:
    """Flip each new basis column to point the same way as the old column of the same index.

    Singular/eigen vectors are defined up to sign; without this, moments kept in
    the rotated space would change sign arbitrarily at every refresh.
    """
    dots = (new * old).sum(dim=-2, keepdim=True)
    return new * torch.where(dots < 0, -1.0, 1.0).to(new.dtype)


def eigh_inverse_root(stack: Tensor, damping: float) -> list[Optional[Tensor]]:
    """V^{-1/2} by eigendecomposition, damping relative to the largest eigenvalue.

    Directions whose damped eigenvalue is not positive get 0 (pseudo-inverse),
    so an exactly rank-deficient V with no damping stays finite.
    """
    def fn(x: Tensor) -> tuple[Tensor, ...]:
        vals, vecs = _eigh(x)
        vals = vals.clamp_min(0)
        lam_max = vals.amax(dim=-1, keepdim=True)
        shifted = vals + damping * lam_max
        tiny = torch.finfo(x.dtype).tiny
        inv = torch.where(shifted > tiny, shifted.clamp_min(tiny).rsqrt(), torch.zeros_like(shifted))
        return ((vecs * inv.unsqueeze(-2)) @ vecs.mT,)

    return [None if r is None else r[0] for r in _robust(fn, stack)]


def newton_schulz_inverse_root(
    stack: Tensor, iterations: int = 10, eps: float = 1e-10, damping: float = 0.0
) -> tuple[Tensor, list[bool]]:
    """Approximate V^{-1/2} with a coupled Newton-Schulz iteration (matmuls only).

    Y0 = V/s, Z0 = I, then T = a I + b ZY + c (ZY)^2, Y <- Y T, Z <- T Z with the
    Polar Express coefficients; on eigenvalues this is exactly the Polar Express
    iteration applied to sqrt(V/s), so Z -> (V/s)^{-1/2}. The scale
    s = 1.01 ||V + eps I||_F puts the spectrum inside (0, 1].

    ``damping`` adds damping * ||V||_F * I first. fp32 round-off leaves tiny
    negative eigenvalues in a rank-deficient V, and the Polar Express
    polynomials grow a negative eigenvalue by ~1e8 over 10 iterations, so an
    undamped low-rank V can diverge; a relative shift of ~1e-6 prevents it.
    A matrix whose
    result is not finite gets the identity, as in the reference code; the
    second return value flags those matrices.
    """
    k, d, _ = stack.shape
    eye = torch.eye(d, dtype=stack.dtype, device=stack.device).expand(k, d, d)
    if damping > 0:
        stack = stack + (damping * torch.linalg.matrix_norm(stack)).view(k, 1, 1) * eye
    scale = 1.01 * torch.linalg.matrix_norm(stack + eps * eye).clamp_min(torch.finfo(stack.dtype).tiny)
    y = stack / scale.view(k, 1, 1)
    z = eye.clone()
    for i in range(iterations):
        a, b, c = POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)]
        zy = torch.bmm(z, y)
        t = torch.baddbmm(zy, zy, zy, beta=b, alpha=c) + a * eye
        y = torch.bmm(y, t)
        z = torch.bmm(t, z)
    root = z / scale.sqrt().view(k, 1, 1)
    bad = ~torch.isfinite(root.flatten(1)).all(dim=1)
    flags = bad.tolist()
    if any(flags):
        root[bad] = eye[bad]
    return root, flags
