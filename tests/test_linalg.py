"""optim.linalg: which errors become decomposition failures, OOM splitting, and the grad bases
computed side by side (only the rotated sides; two-sided bases that diagonalize G)."""
import json

import pytest
import torch
from reference import RefAdaDiag
from torch import nn

import ds_structopt as dso
from ds_structopt.bench import decomp
from ds_structopt.optim import linalg

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _stack(k, m, n, seed=0):
    return torch.randn(k, m, n, generator=torch.Generator().manual_seed(seed))


def _oom_above_one(real, calls):
    """A decomposition that runs out of memory on any stack of more than one matrix."""
    def call(x, *args, **kwargs):
        calls.append((x.shape[0], x.dtype))
        if x.shape[0] > 1:
            raise OOM("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(x, *args, **kwargs)
    return call


# (hook, svd_bases arguments): the two-sided default goes through _svd, the one-sided one through _eigh
PATHS = [("_svd", dict(left=True, right=True, method="auto")),
         ("_eigh", dict(left=True, right=False, method="auto")),
         ("_eigh", dict(left=True, right=True, method="gram"))]


@pytest.mark.parametrize("hook,kwargs", PATHS)
def test_oom_on_a_stack_splits_it_and_gives_the_unsplit_results(monkeypatch, hook, kwargs):
    stack = _stack(5, 6, 9)
    expected = linalg.svd_bases(stack, **kwargs)
    calls = []
    monkeypatch.setattr(linalg, hook, _oom_above_one(getattr(linalg, hook), calls))
    got = linalg.svd_bases(stack, **kwargs)
    assert [k for k, _ in calls] == [5, 2, 1, 1, 3, 1, 2, 1, 1]  # halves, recursively, down to one
    # no per-matrix fp64 retries (an OOM is not a decomposition failure); the Gram route is fp64 anyway
    assert {dtype for _, dtype in calls} == {torch.float64 if hook == "_eigh" else torch.float32}
    for exp, res in zip(expected, got):
        assert res is not None
        for a, b in zip(exp, res):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)  # batched LAPACK: round-off only


@pytest.mark.parametrize("hook,kwargs", PATHS)
@pytest.mark.parametrize("k", [1, 3])
def test_oom_on_a_single_matrix_propagates(monkeypatch, hook, kwargs, k):
    def always_oom(*args, **kw):
        raise OOM("CUDA out of memory (injected)")

    monkeypatch.setattr(linalg, hook, always_oom)
    with pytest.raises(OOM):
        linalg.svd_bases(_stack(k, 6, 9), **kwargs)


def test_oom_in_the_optimizer_is_not_an_identity_fallback(monkeypatch):
    def always_oom(*args, **kw):
        raise OOM("CUDA out of memory (injected)")

    monkeypatch.setattr(linalg, "_eigh", always_oom)
    w = nn.Parameter(torch.randn(4, 6))
    opt = dso.AdaDiag([w], lr=1e-2)
    w.grad = torch.randn(4, 6)
    with pytest.raises(OOM):
        opt.step()
    assert opt.state[w].get("identity_fallbacks", 0) == 0


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered",
                                     "cusolver error: CUSOLVER_STATUS_INTERNAL_ERROR, when calling `cusolverDnXgesvd`"])
@pytest.mark.parametrize("hook,kwargs", PATHS)
def test_other_runtime_errors_propagate(monkeypatch, hook, kwargs, message):
    def broken(*args, **kw):
        raise RuntimeError(message)

    monkeypatch.setattr(linalg, hook, broken)
    with pytest.raises(RuntimeError, match="CUDA error|cusolver error"):
        linalg.svd_bases(_stack(3, 6, 9), **kwargs)
    w = nn.Parameter(torch.randn(5, 7))
    opt = dso.AdaDiagPP([w], lr=1e-2, basis="grad", **({"decomposition": "gram"} if hook == "_eigh" else {}))
    w.grad = torch.randn(5, 7)
    with pytest.raises(RuntimeError, match="CUDA error|cusolver error"):
        opt.step()


@pytest.mark.parametrize("error", [
    torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix is "
                             "ill-conditioned or has too many repeated singular values (error code: 3)."),
    RuntimeError("linalg.eigh: The algorithm failed to converge (error code: 7)"),  # as a plain RuntimeError
    RuntimeError("[fault injection] decomposition call 3 failed"),  # ds_structopt.faults
])
@pytest.mark.parametrize("hook,kwargs", PATHS)
def test_decomposition_failures_still_retry_in_fp64_then_give_none(monkeypatch, hook, kwargs, error):
    real, calls = getattr(linalg, hook), []

    def fails_in_fp32(x, *args, **kw):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise error
        return real(x, *args, **kw)

    stack = _stack(3, 6, 9)
    monkeypatch.setattr(linalg, hook, fails_in_fp32)
    res = linalg.svd_bases(stack, **kwargs)
    if hook == "_eigh":  # the Gram route works in fp64 throughout: nothing for an fp32 failure to hit
        assert all(r is not None for r in res)
    else:
        assert calls == [torch.float32] + [torch.float64] * 3
        assert all(r is not None and r[0].dtype == torch.float32 for r in res)

    def always(*args, **kw):
        raise error

    monkeypatch.setattr(linalg, hook, always)
    assert linalg.svd_bases(stack, **kwargs) == [None, None, None]


def test_error_classification():
    assert linalg.is_decomposition_failure(torch.linalg.LinAlgError("x"))
    assert linalg.is_decomposition_failure(RuntimeError("the algorithm failed to converge"))
    assert not linalg.is_decomposition_failure(OOM("CUDA out of memory"))
    assert not linalg.is_decomposition_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not linalg.is_decomposition_failure(ValueError("failed to converge"))


# ----- grad bases: only the rotated sides ------------------------------------------------
def _record(monkeypatch):
    calls = {"_svd": [], "_eigh": [], "_qr": []}
    for name in calls:
        real = getattr(linalg, name)

        def call(x, *args, _real=real, _name=name, **kw):
            calls[_name].append(tuple(x.shape[-2:]))
            return _real(x, *args, **kw)

        monkeypatch.setattr(linalg, name, call)
    return calls


@pytest.mark.parametrize("cls,shape,opts,side", [
    (dso.AdaDiag, (8, 40), {}, 8),                          # left rotated, 40 x 40 never formed
    (dso.AdaDiag, (40, 8), {}, 8),                          # right rotated
    (dso.AdaDiagPP, (8, 40), {"max_precond_dim": 20}, 8),  # the 40 side exceeds max_precond_dim
])
def test_one_sided_computes_only_the_rotated_side(monkeypatch, cls, shape, opts, side):
    calls = _record(monkeypatch)
    w = nn.Parameter(torch.randn(*shape))
    opt = cls([w], lr=1e-2, **opts)
    w.grad = torch.randn(*shape)
    opt.step()
    st = opt.state[w]
    assert calls["_svd"] == [] and calls["_qr"] == []
    assert calls["_eigh"] == [(side, side)]
    basis = st["P"] if st["rotate_left"] else st["Q"]
    assert basis.shape == (side, side) and basis.dtype == torch.float32
    g = w.grad.double()
    gram = g @ g.T if st["rotate_left"] else g.T @ g
    ref = torch.linalg.eigh(gram)[1].flip(-1)
    torch.testing.assert_close((basis.double() * ref).sum(0).abs(), torch.ones(side, dtype=torch.float64), atol=1e-6, rtol=0)


def _block_repeated(seed=0):
    """[[A, 0], [0, A]]: every singular value exactly twice, so each side's eigh may mix the pairs."""
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    g = torch.zeros(6, 8)
    g[:3, :4], g[3:, 4:] = a, a
    return g


def _offdiag_mass(x):
    d = torch.zeros_like(x)
    d.diagonal().copy_(x.diagonal())
    return float((x - d).norm() / x.norm().clamp_min(1e-30))


@pytest.mark.parametrize("make", [
    lambda: torch.randn(12, 20),
    lambda: torch.randn(20, 12),
    lambda: torch.randn(16, 16),
    lambda: torch.randn(10, 3) @ torch.randn(3, 14),    # rank 3: null spaces on both sides
    _block_repeated,
    lambda: torch.diag(torch.tensor([3.0, 2.0, 2.0, 1.0])),  # exactly repeated, already diagonal
], ids=["wide", "tall", "square", "rank3", "repeated-pairs", "diagonal"])
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_two_sided_bases_are_orthogonal_and_diagonalize_g(make, method):
    g = make()
    m, n = g.shape
    (p, q), = linalg.svd_bases(g.unsqueeze(0), True, True, method)
    assert p.shape == (m, m) and q.shape == (n, n) and p.dtype == q.dtype == torch.float32
    for b in (p, q):
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[0]), atol=1e-5, rtol=0)
    rotated = p.double().T @ g.double() @ q.double()
    assert _offdiag_mass(rotated) < 1e-5
    s = torch.linalg.svdvals(g.double())
    torch.testing.assert_close(rotated.diagonal().abs(), s, atol=1e-5, rtol=1e-5)  # decreasing order


def test_gram_two_sided_of_a_zero_gradient_is_an_orthogonal_basis():
    (p, q), = linalg.svd_bases(torch.zeros(1, 3, 5), True, True, "gram")
    for b in (p, q):
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[0]))


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (5, 5)])
@pytest.mark.parametrize("cls,two_sided", [(dso.AdaDiag, False), (dso.AdaDiagPP, True)])
@pytest.mark.parametrize("method", ["auto", "svd", "gram"])
@pytest.mark.parametrize("variant", [{}, {"moments": "reproject"}, {"factored": True}])
def test_every_decomposition_follows_the_reference(shape, cls, two_sided, method, variant):
    """test_trajectories' three-step check (same data, same tolerance) for each ``decomposition``.

    Two-sided with m != n: "gram" completes the larger side's null space by QR, not as LAPACK's
    full SVD does; the completion is arbitrary (ALGORITHMS.md ambiguity 2) and a later gradient
    sees it, so only a basis refreshed every step (update_freq=1) has a unique trajectory there.
    """
    w0 = torch.randn(*shape)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(*shape, generator=gen) for _ in range(3)]
    freq = 1 if two_sided and method == "gram" and shape[0] != shape[1] else 2
    hp = dict(preset="paper", lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, update_freq=freq,
              **variant)  # the decompositions serve basis="grad"
    w = nn.Parameter(w0.clone())
    opt = cls([w], decomposition=method, **hp)
    ref = RefAdaDiag(w0, lr=0.05, betas=(0.9, 0.99), eps=1e-8, wd=0.1, update_freq=freq, two_sided=two_sided,
                     factored=variant.get("factored", False), moments=variant.get("moments", "rotated"))
    for t, g in enumerate(grads, 1):
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach().double(), ref.step(g), rtol=1e-4, atol=2e-6, msg=lambda s: f"step {t}: {s}")


def test_decomposition_option_is_validated():
    with pytest.raises(ValueError, match="decomposition"):
        dso.AdaDiagPP([nn.Parameter(torch.zeros(2, 2))], decomposition="eigh")
    assert dso.AdaDiag.DEFAULTS["decomposition"] == "auto"


# ----- the benchmark ------------------------------------------------------------------------
def test_decomp_benchmark_writes_every_method_row(tmp_path, capsys):
    out = tmp_path / "decomp.json"
    assert decomp.main(["--device", "cpu", "--sizes", "12x12", "8x20", "--repeats", "1", "--warmup", "0",
                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    expected = {"svd full_matrices=False", "svd full_matrices=True", "eigh gram left float32",
                "eigh gram left float64", "eigh gram right float32", "eigh gram right float64",
                "svd_bases one-sided decomposition=auto", "svd_bases two-sided decomposition=svd",
                "svd_bases two-sided decomposition=gram"}
    for size in ("12x12", "8x20"):
        got = {r["method"]: r for r in rows if r["size"] == size}
        assert set(got) == expected
        for r in got.values():
            assert r["error"] is None and r["seconds"] >= 0 and r["orth"] < 1e-5 and r["offdiag"] < 1e-5, r
    assert "| 8x20 | svd_bases one-sided decomposition=auto |" in capsys.readouterr().out
