"""Batched, failure-tolerant matrix decompositions used by the structured optimizers.

Every function takes a stack of fp32 matrices shaped (k, a, b) and works on the
whole stack in one call. A decomposition that raises or returns non-finite
values is retried for that matrix alone in fp64; whatever still fails comes
back as ``None`` so the caller can keep its previous basis and count the
failure. Only decomposition failures are handled that way (see
``is_decomposition_failure``): an out-of-memory error splits the stack in halves
and retries them (a single matrix that still does not fit re-raises), and any
other error propagates. Nothing here knows about optimizer state or DeepSpeed.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

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


# torch.OutOfMemoryError appeared in torch 2.5; before, only the CUDA alias existed.
_OOM: type[BaseException] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Plain RuntimeErrors that still mean "this matrix did not decompose". torch (2.13 checked) raises
# torch.linalg.LinAlgError for every failure it detects itself: LAPACK/cuSOLVER/MAGMA info > 0
# ("linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned or
# has too many repeated singular values (error code: N)", the same for eigh with "eigenvalues",
# "... because the input matrix contained non-finite values") and cuSOLVER's
# CUSOLVER_STATUS_INVALID_VALUE on NaN input (CUDA >= 11.5; EXECUTION_FAILED before). The
# messages are matched too for backends/builds that raise them as plain RuntimeErrors, and
# ds_structopt.faults injects "[fault injection] decomposition call N failed". Everything else
# (other cuSOLVER statuses, "CUDA error: an illegal memory access", bad shapes, ...) is a bug or
# a broken device, not a numerical failure, and must not become a silent identity basis.
_DECOMPOSITION_FAILURE = re.compile(r"failed to converge|ill-conditioned|\[fault injection\] decomposition")


def is_decomposition_failure(err: BaseException) -> bool:
    """Does ``err`` mean the matrix did not decompose (retry in fp64 / keep the old basis)?"""
    if isinstance(err, _OOM) or not isinstance(err, RuntimeError):
        return False
    return isinstance(err, torch.linalg.LinAlgError) or bool(_DECOMPOSITION_FAILURE.search(str(err)))


def _robust(fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> list[Optional[tuple[Tensor, ...]]]:
    """Run ``fn`` on whole stacks; retry failing items one by one in fp64.

    Out of memory on a stack of k > 1: the two halves are run separately (recursively), so a
    refresh that does not fit in one call still gets exact results; one matrix that does not
    fit re-raises (an OOM is never turned into a failed decomposition).
    """
    count, dtype = inputs[0].shape[0], inputs[0].dtype
    results: list[Optional[tuple[Tensor, ...]]] = [None] * count
    split = False
    try:
        outs = fn(*inputs)
        ok = _item_ok(*outs)
    except _OOM:
        if count == 1:
            raise
        split = True
    except RuntimeError as err:
        if not is_decomposition_failure(err):
            raise
        outs, ok = None, [False] * count
    if split:  # outside the except block: the failed attempt's tensors are released first
        half = count // 2
        return _robust(fn, *(x[:half] for x in inputs)) + _robust(fn, *(x[half:] for x in inputs))
    for i, good in enumerate(ok):
        if good:
            results[i] = tuple(o[i] for o in outs)
            continue
        try:
            retry = fn(*(x[i : i + 1].double() for x in inputs))
        except RuntimeError as err:
            if not is_decomposition_failure(err):
                raise
            continue
        if all(_item_ok(*retry)):
            results[i] = tuple(o[0].to(dtype) for o in retry)
    return results


#: How ``svd_bases`` computes a gradient's singular bases (AdaDiag's ``decomposition`` option).
GRAD_DECOMPOSITIONS = ("auto", "svd", "gram")


def svd_bases(
    stack: Tensor, left: bool, right: bool, method: str = "auto"
) -> list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]]:
    """Orthogonal bases from the SVD of each gradient: P (m x m) and/or Q (n x n).

    Singular vectors come sorted by decreasing singular value; a side not asked
    for is None and is not computed at all. Methods:

    * ``"svd"``: torch.linalg.svd of G, both sides. Full matrices are only
      requested when a wanted side is the larger one (its null-space completion
      is then arbitrary, as the algorithm allows).
    * ``"gram"``: eigh of the fp64 Gram matrix of the rotated side (G G^T for P,
      G^T G for Q): one k^2 l GEMM plus a k^3 eigh, never the other side. fp64
      because squaring G squares its condition number: an fp32 Gram loses every
      direction below ~3e-4 sigma_max. Two-sided: eigh of the smaller side only,
      the other side's vectors are G^T u_i / sigma_i (completed to a square basis
      by QR), so u_i and v_i stay paired even inside (near-)repeated singular
      values and P^T G Q is diagonal, as ``_keep_diagonal`` assumes; two
      independent eighs would mix a repeated pair differently on each side.
    * ``"auto"``: ``"gram"`` when one side is rotated, ``"svd"`` when both.
    """
    if method not in GRAD_DECOMPOSITIONS:
        raise ValueError(f"svd_bases: method must be one of {GRAD_DECOMPOSITIONS}, got {method!r}")
    if method == "auto":
        method = "svd" if left and right else "gram"
    m, n = stack.shape[-2:]
    if method == "gram":
        fn = _gram_two_sided if left and right else (lambda x: (_gram_side(x, left),))
    else:
        full = (left and m > n) or (right and n > m)

        def fn(x: Tensor) -> tuple[Tensor, ...]:
            u, _, vh = _svd(x, full_matrices=full)
            return u, vh.mT

    out: list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]] = []
    for res in _robust(fn, stack):
        if res is None:
            out.append(None)
        elif left and right:
            out.append((res[0].contiguous(), res[1].contiguous()))
        elif method == "gram":
            out.append((res[0].contiguous(), None) if left else (None, res[0].contiguous()))
        else:
            out.append((res[0] if left else None, res[1].contiguous() if right else None))
    return out


def _gram_side(x: Tensor, left: bool) -> Tensor:
    """Eigenvectors of G G^T (left) or G^T G (right) by decreasing eigenvalue, Gram and eigh in fp64."""
    g = x.double()
    _, vecs = _eigh(g @ g.mT if left else g.mT @ g)
    return vecs.flip(-1).to(x.dtype)


def _gram_two_sided(x: Tensor) -> tuple[Tensor, Tensor]:
    """(P, Q) of G: eigh of the smaller side's fp64 Gram, the other side derived from it.

    With a = G (or G^T, whichever is wide) and a a^T = U diag(s^2) U^T, the columns
    of a^T U are s_i v_i; Householder QR (complete) of their normalized versions
    re-orthogonalizes them (largest first, so the best-determined keep their
    direction) and completes the null space. Zero columns (s_i = 0) just take a
    completion vector. Column signs follow R's diagonal so column i is +v_i.
    """
    wide = x.shape[-2] <= x.shape[-1]
    a = x.double() if wide else x.double().mT
    k = a.shape[-2]
    _, u = _eigh(a @ a.mT)
    u = u.flip(-1)
    w = a.mT @ u
    sig = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
    w = torch.where(sig > 0, w / torch.where(sig > 0, sig, torch.ones_like(sig)), torch.zeros_like(w))
    q, r = _qr(w, mode="complete")
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    q = torch.cat([q[..., :k] * sign.unsqueeze(-2), q[..., k:]], dim=-1)
    u, q = u.to(x.dtype), q.to(x.dtype)
    return (u, q) if wide else (q, u)


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
    stack: Tensor, iterations: int = 10, eps: float = 1e-10, damping: float = 0.0,
    workspace: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor]:
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
    second return value flags those matrices (a bool tensor, left on the device).

    The iteration runs in four buffers shaped like ``stack`` (y, z, t and a spare that takes
    turns with y and z). ``workspace``: up to four such tensors the caller no longer needs
    (ASGO's scratch gradient, carved into d x d blocks), used for them before anything is
    allocated; the root returned is never one of them. The same operations whatever the
    workspace: bit-identical on the CPU (checked); on a GPU a block's alignment may pick another
    GEMM kernel (last-bit differences).
    """
    k, d, _ = stack.shape
    free = list(workspace)[:4]
    fresh: list[Tensor] = []

    def buffer() -> Tensor:
        if free:
            return free.pop(0)
        fresh.append(torch.empty_like(stack))
        return fresh[-1]

    # x + s I as a diagonal add (no identity matrix: exactly the same values); the buffers not
    # taken from the workspace are what a distributed ASGO owner adds to its state
    t = buffer()
    y = buffer().copy_(stack)
    if damping > 0:
        _add_to_diagonal(y, damping * torch.linalg.matrix_norm(stack))
    shifted = t.copy_(y)  # t is free until the iteration
    _add_to_diagonal(shifted, eps)
    scale = 1.01 * torch.linalg.matrix_norm(shifted).clamp_min(torch.finfo(stack.dtype).tiny)
    y.div_(scale.view(k, 1, 1))
    z = buffer().zero_()
    _add_to_diagonal(z, 1.0)
    spare = buffer()
    for i in range(iterations):
        a, b, c = POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)]
        zy = torch.bmm(z, y, out=spare)
        torch.baddbmm(zy, zy, zy, beta=b, alpha=c, out=t)
        _add_to_diagonal(t, a)
        y, spare = torch.bmm(y, t, out=zy), y
        z, spare = torch.bmm(t, z, out=spare), z
    in_workspace = not any(z is f for f in fresh)
    del y, t, spare
    free.clear()  # the other buffers are freed before the result may need one
    fresh.clear()
    if in_workspace:  # the result never lives in the caller's workspace
        z = torch.empty_like(stack).copy_(z)
    root = z.div_(scale.sqrt().view(k, 1, 1))
    # per matrix: all finite iff its max and min are (amax/amin propagate NaN); no full-size mask
    flat = root.flatten(1)
    finite = torch.isfinite(flat.amax(dim=1)) & torch.isfinite(flat.amin(dim=1))
    # not finite -> the identity: zeros plus a diagonal of ones (no mask indexing: no sync on a GPU)
    root.masked_fill_(~finite.view(k, 1, 1), 0.0)
    _add_to_diagonal(root, (~finite).to(root.dtype))
    return root, ~finite


def _add_to_diagonal(x: Tensor, value: "float | Tensor") -> None:
    """x[..., i, i] += value (a number, or one per matrix of the stack), in place."""
    x.diagonal(dim1=-2, dim2=-1).add_(value.view(-1, 1) if isinstance(value, Tensor) else value)

