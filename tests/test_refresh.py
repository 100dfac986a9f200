"""Staggered basis refresh: every matrix refreshes once per T-step window, at a phase chosen so each
step carries about the same decomposition cost; deterministic and carried through checkpoints."""
import io

import pytest
import torch

import ds_structopt as dso
from ds_structopt.optim.refresh import PhasePlanner, first_refresh_window, refresh_due

SHAPES = [(96, 32), (64, 64), (64, 64), (48, 80), (32, 32), (32, 32), (24, 40), (16, 16)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in SHAPES]


def _grads(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt_factory, steps, params=None, opt=None, start=0):
    params = params if params is not None else _params()
    opt = opt if opt is not None else opt_factory(params)
    for t in range(start, steps):
        for p, g in zip(params, _grads(t, params)):
            p.grad = g
        opt.step()
    return params, opt


def _resume_through_checkpoint(make, params, opt, start, steps):
    """Save optimizer state and params (weights_only-loadable), rebuild both, run on to ``steps``.
    Returns (what was saved, the resumed params)."""
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    _run(make, steps, params=resumed, opt=opt2, start=start)
    return saved, resumed


def test_refresh_due_schedule():
    assert [t for t in range(1, 13) if refresh_due(t, 4)] == [1, 5, 9]
    assert [t for t in range(1, 13) if refresh_due(t, 4, phase=2)] == [1, 3, 7, 11]


def test_phases_spread_cost_evenly():
    planner = PhasePlanner()
    states = [{} for _ in SHAPES]
    opts = dso.AdaDiagPP.resolve_options({})
    costs = [dso.AdaDiagPP.refresh_flops(m, n, opts) for m, n in SHAPES]
    planner.assign(states, costs, 4)
    per_slot = planner.loads[4]
    assert sorted({st["refresh_phase"] for st in states}) == [0, 1, 2, 3]
    assert max(per_slot) <= max(costs) + sum(costs) / 4  # LPT bound


@pytest.mark.parametrize("cls,opts", [(dso.AdaDiagPP, {}), (dso.AdaDiag, {}), (dso.ASGO, {"root": "eigh"})])
def test_each_matrix_refreshes_once_per_window_at_its_phase(cls, opts):
    T = 4
    params, opt = _run(lambda ps: cls(ps, lr=1e-3, update_freq=T, stagger_refresh=True, **opts), 1 + 2 * T)
    phases = [opt.state[p]["refresh_phase"] for p in params]
    assert len(set(phases)) > 1  # staggered, not all at the same step
    for p in params:
        st = opt.state[p]
        expected = sum(refresh_due(t, T, st["refresh_phase"], first_refresh_window(opt.param_groups[0]))
                       for t in range(1, 2 * T + 2))
        assert st["refreshes"] == expected


def test_stagger_is_deterministic_and_survives_a_checkpoint_mid_window():
    make = lambda ps: dso.AdaDiagPP(ps, lr=1e-3, update_freq=5, stagger_refresh=True)  # noqa: E731
    full, _ = _run(make, 13)
    again, _ = _run(make, 13)
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    params, opt = _run(make, 7)  # stop mid-window
    _, resumed = _resume_through_checkpoint(make, params, opt, start=7, steps=13)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_stagger_option_is_validated():
    with pytest.raises(ValueError, match="stagger_refresh"):
        dso.AdaDiagPP(_params(), stagger_refresh="yes")


# ----- refresh_from="previous": decompositions one step ahead, in a worker thread -----------------
AHEAD_CASES = [(dso.AdaDiagPP, {}), (dso.AdaDiag, {"basis": "ema"}), (dso.AdaDiagPP, {"basis": "ema", "power_qr": True}),
               (dso.ASGO, {"root": "eigh", "damping": 1e-4}), (dso.AdaDiagPP, {"refresh_ahead_steps": 3}),
               (dso.ASGO, {"root": "eigh", "damping": 1e-4, "refresh_ahead_steps": 2})]


@pytest.mark.parametrize("lead", [1, 2])
def test_ahead_installs_the_basis_of_an_earlier_gradient(lead):
    """At a refresh step t the basis is the SVD basis of G_{t-lead} (columns up to sign), not of G_t."""
    T = 4
    params, opt = _run(lambda ps: dso.AdaDiagPP(ps, lr=1e-3, update_freq=T, refresh_from="previous",
                                                refresh_ahead_steps=lead, basis="grad"), 1 + T)
    previous = _grads(T - lead, params)  # _run's index i feeds global step i + 1; step 1 + T is due
    for p, g in zip(params, previous):
        st = opt.state[p]
        u, _, vh = torch.linalg.svd(g)
        overlap = (st["P"].mT @ u).diagonal().abs()
        assert torch.allclose(overlap, torch.ones_like(overlap), atol=1e-3), p.shape
        assert st["refreshes"] == 2


@pytest.mark.parametrize("cls, extra", AHEAD_CASES)
def test_ahead_is_deterministic_and_survives_a_checkpoint_with_work_in_flight(cls, extra):
    make = lambda ps: cls(ps, lr=1e-3, update_freq=5, stagger_refresh=True, refresh_from="previous", **extra)  # noqa: E731
    full, _ = _run(make, 13)
    again, _ = _run(make, 13)
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    params, opt = _run(make, 7)  # matrices due at step 8 are being decomposed now
    assert len(opt.refresh_ahead) > 0
    saved, resumed = _resume_through_checkpoint(make, params, opt, start=7, steps=13)
    assert any("pending_refresh" in st for st in saved["opt"]["state"].values())
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_ahead_differs_from_current_and_still_learns():
    target = [torch.randn(s) for s in SHAPES]

    def run(mode):
        params = _params()
        opt = dso.AdaDiagPP(params, lr=5e-2, update_freq=3, refresh_from=mode)
        for _ in range(60):
            opt.zero_grad()
            sum(((p - t) ** 2).sum() for p, t in zip(params, target)).backward()
            opt.step()
        return sum(((p - t) ** 2).sum().item() for p, t in zip(params, target))

    start = sum(((p - t) ** 2).sum().item() for p, t in zip(_params(), target))
    current, ahead = run("current"), run("previous")
    assert ahead != current and ahead < 0.5 * start


def test_refresh_from_is_validated():
    with pytest.raises(ValueError, match="refresh_from"):
        dso.AdaDiagPP(_params(), refresh_from="next")
    with pytest.raises(ValueError, match="refresh_from"):
        dso.ASGO(_params(), refresh_from=1)
    with pytest.raises(ValueError, match="refresh_ahead_steps must be below update_freq"):
        dso.AdaDiagPP(_params(), update_freq=5, refresh_from="previous", refresh_ahead_steps=5)
    with pytest.raises(ValueError, match="refresh_ahead_steps"):
        dso.AdaDiagPP(_params(), refresh_ahead_steps=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (side-stream path; run on the device machine)")
def test_ahead_on_a_side_cuda_stream_matches_cpu():
    def run(device):
        params = [torch.nn.Parameter(p.detach().to(device)) for p in _params()]
        opt = dso.AdaDiagPP(params, lr=1e-3, update_freq=3, stagger_refresh=True, refresh_from="previous")
        for t in range(10):
            for p, g in zip(params, _grads(t, params)):
                p.grad = g.to(device)
            opt.step()
        return [p.detach().cpu() for p in params]

    cpu, gpu = run("cpu"), run("cuda")
    for a, b in zip(cpu, gpu):
        assert ((a - b).norm() / a.norm()).item() < 1e-3


# ----- the first refresh, spread over first_refresh_window steps (stagger_refresh) -----------------
SAME = [(32, 32)] * 16  # equal costs: LPT gives every phase the same number of matrices


def _counts_per_step(opt, params, steps, start=0):
    """Refreshes done at each step (the counters' increase), running ``_grads`` from ``start``."""
    out = []
    for t in range(start, steps):
        before = sum(opt.state[p].get("refreshes", 0) for p in params)
        for p, g in zip(params, _grads(t, params)):
            p.grad = g
        opt.step()
        out.append(sum(opt.state[p]["refreshes"] for p in params) - before)
    return out


def _has_basis(opt, p):
    st = opt.state[p]
    if "root" in st:
        return st["root"] is not None
    return (not st["rotate_left"] or st["P"] is not None) and (not st["rotate_right"] or st["Q"] is not None)


def test_refresh_due_first_window():
    assert [t for t in range(1, 20) if refresh_due(t, 8, phase=5, first_window=4)] == [2, 6, 14]
    assert [t for t in range(1, 20) if refresh_due(t, 8, phase=2, first_window=4)] == [3, 11, 19]
    assert [t for t in range(1, 20) if refresh_due(t, 8, phase=5, first_window=1)] == [1, 6, 14]  # the paper's
    assert [t for t in range(1, 9) if refresh_due(t, 4, phase=3, first_window=99)] == [4, 8]  # capped at T
    assert first_refresh_window({"update_freq": 200, "stagger_refresh": True, "first_refresh_window": None}) == 8
    assert first_refresh_window({"update_freq": 5, "stagger_refresh": True, "first_refresh_window": None}) == 5
    assert first_refresh_window({"update_freq": 200, "stagger_refresh": False, "first_refresh_window": 16}) == 1


FIRST_CASES = [(dso.AdaDiagPP, {}), (dso.AdaDiag, {}), (dso.AdaDiagPP, {"basis": "ema"}),
               (dso.ASGO, {"root": "eigh", "damping": 1e-4}), (dso.AdaDiagPP, {"refresh_from": "previous"}),
               (dso.ASGO, {"root": "eigh", "damping": 1e-4, "refresh_from": "previous"})]


@pytest.mark.parametrize("cls, extra", FIRST_CASES)
def test_first_refresh_is_spread_over_the_window(cls, extra):
    T, W = 8, 4
    make = lambda ps: cls(ps, lr=1e-3, update_freq=T, stagger_refresh=True, first_refresh_window=W, **extra)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in SAME]
    opt = make(params)
    counts = _counts_per_step(opt, params, W)
    assert counts == [len(SAME) // W] * W  # each of the first W steps does a quarter, none does all
    assert all(_has_basis(opt, p) for p in params)
    # mixed shapes: costs, not counts, are balanced, but no step does them all and all are done by W
    params = _params()
    opt = make(params)
    counts = _counts_per_step(opt, params, W)
    assert all(0 < c < len(SHAPES) for c in counts) and sum(counts) == len(SHAPES)
    assert all(_has_basis(opt, p) for p in params)
    full, _ = _run(make, 13)
    again, _ = _run(make, 13)
    assert all(torch.equal(a, b) for a, b in zip(full, again))


def test_first_refresh_default_window_and_stagger_off():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SAME]
    opt = dso.AdaDiagPP(params, lr=1e-3, update_freq=200, stagger_refresh=True)
    assert _counts_per_step(opt, params, 8) == [2] * 8  # default window min(T, 8)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SAME]
    opt = dso.AdaDiagPP(params, lr=1e-3, update_freq=8, first_refresh_window=4)  # no staggering: ignored
    assert _counts_per_step(opt, params, 9) == [len(SAME)] + [0] * 7 + [len(SAME)]


@pytest.mark.parametrize("cls, extra", [(dso.AdaDiagPP, {}), (dso.ASGO, {"root": "eigh", "weight_decay": 0.0})])
def test_before_its_first_basis_a_matrix_runs_unrotated(cls, extra):
    """Step 1 of a matrix whose first refresh comes later: AdaDiag = Adam (sign-like g/(|g|+eps)),
    ASGO eigh = the RMS-matched momentum (identity preconditioner)."""
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = cls(params, lr=1e-3, update_freq=8, stagger_refresh=True, **extra)
    grads = _grads(0, params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    waiting = [i for i, p in enumerate(params) if not _has_basis(opt, p)]
    assert waiting and len(waiting) < len(params)
    for i in waiting:
        g = grads[i]
        if cls is dso.ASGO:
            m = 0.1 * g
            expected = -1e-3 * 0.2 * m * (m.numel() ** 0.5) / m.norm()
        else:
            expected = -1e-3 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(params[i].detach() - before[i], expected, rtol=1e-4, atol=5e-8)  # ulps of W


def test_reproject_carries_the_unrotated_moments_into_the_first_basis():
    T, b1 = 8, 0.9
    params = _params()
    opt = dso.AdaDiagPP(params, lr=1e-3, update_freq=T, stagger_refresh=True, moments="reproject", basis="grad")
    _run(None, 1, params=params, opt=opt)
    late = [p for p in params if opt.state[p]["P"] is None]
    first = {id(p): 1 + opt.state[p]["refresh_phase"] % first_refresh_window(opt.param_groups[0]) for p in late}
    for t in range(1, T):
        moments = {id(p): opt.state[p]["exp_avg"].clone() for p in late}
        grads = _grads(t, params)
        _run(None, t + 1, params=params, opt=opt, start=t)
        for p, g in zip(params, grads):
            if id(p) in first and first[id(p)] == t + 1:
                st = opt.state[p]
                rotated = st["P"].mT @ g @ st["Q"]
                diagonal = torch.zeros_like(rotated)  # P^T G Q of a fresh SVD basis, round-off dropped
                diagonal.diagonal().copy_(rotated.diagonal())
                expected = b1 * (st["P"].mT @ moments[id(p)] @ st["Q"]) + (1 - b1) * diagonal
                torch.testing.assert_close(st["exp_avg"], expected, rtol=1e-4, atol=1e-6)
                del first[id(p)]
    assert not first  # every late matrix was checked


@pytest.mark.parametrize("cls, extra", FIRST_CASES)
def test_resume_inside_the_first_window_is_bitwise_equal(cls, extra):
    make = lambda ps: cls(ps, lr=1e-3, update_freq=8, stagger_refresh=True, first_refresh_window=4, **extra)  # noqa: E731
    full, _ = _run(make, 10)
    params, opt = _run(make, 2)  # saved at step 2: half of the matrices have no basis yet
    assert not all(_has_basis(opt, p) for p in params)
    _, resumed = _resume_through_checkpoint(make, params, opt, start=2, steps=10)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_first_refresh_window_is_validated():
    for bad in (0, -1, 2.0, "4", True):
        with pytest.raises(ValueError, match="first_refresh_window"):
            dso.AdaDiagPP(_params(), stagger_refresh=True, first_refresh_window=bad)
    with pytest.raises(ValueError, match="first_refresh_window"):
        dso.ASGO(_params(), root="eigh", first_refresh_window=0)


def test_cpu_refresh_ahead_makes_no_stream():
    params, opt = _run(lambda ps: dso.AdaDiagPP(ps, lr=1e-3, update_freq=3, refresh_from="previous"), 5)
    assert opt.refresh_ahead._streams == {}


# ----- refresh-ahead on GPU: one side stream, the right device, no allocator races ---------------
def _cuda_run(device, steps, make, spy=None, pressure=False):
    params = [torch.nn.Parameter(p.detach().to(device)) for p in _params()]
    opt = make(params)
    handles = []
    for t in range(steps):
        for p, g in zip(params, _grads(t, params)):
            p.grad = g.to(device)
        opt.step()
        if pressure:  # reuse freed blocks on the main stream at once and fill them with garbage
            torch.cuda._sleep(20_000_000)  # main stream late: the side stream runs ahead of it
            junk = [torch.full(s, float("nan"), device=device) for s in SHAPES for _ in range(4)]
            junk += [torch.full((1 << 22,), float("nan"), device=device) for _ in range(4)]
            del junk
        if opt.refresh_ahead._streams:
            handles.append(opt.refresh_ahead.side_stream(torch.device(device)).cuda_stream)
    torch.cuda.synchronize()
    return [p.detach().cpu() for p in params], opt, handles


def _ahead(ps):
    return dso.AdaDiagPP(ps, lr=1e-3, update_freq=3, stagger_refresh=True, refresh_from="previous")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_low_priority_side_stream_per_optimizer_and_device():
    _, opt, handles = _cuda_run("cuda", 8, _ahead)
    assert len(handles) >= 7 and len(set(handles)) == 1
    assert len(opt.refresh_ahead._streams) == 1
    stream = next(iter(opt.refresh_ahead._streams.values()))
    assert stream.cuda_stream != torch.cuda.current_stream().cuda_stream
    assert stream.priority == max(stream.priority_range())  # numerically largest = least priority


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_worker_thread_runs_on_the_optimizers_device(monkeypatch):
    from ds_structopt.optim.refresh import RefreshAhead

    seen = []
    original = RefreshAhead.submit

    def spy(self, states, compute, device, inputs=()):
        def wrapped():
            seen.append(torch.cuda.current_device())
            return compute()
        return original(self, states, wrapped, device, inputs)

    monkeypatch.setattr(RefreshAhead, "submit", spy)
    assert torch.cuda.current_device() == 0
    _cuda_run("cuda:1", 6, _ahead)
    assert seen and set(seen) == {1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_side_stream_results_match_synchronous_refresh_under_allocator_pressure(monkeypatch):
    from concurrent.futures import Future

    from ds_structopt.optim.refresh import RefreshAhead

    original = RefreshAhead.submit

    def slow_side_stream(self, states, compute, device, inputs=()):
        def wrapped():
            torch.cuda._sleep(50_000_000)  # the side stream reads its inputs late
            return compute()
        return original(self, states, wrapped, device, inputs)

    def synchronous(self, states, compute, device, inputs=()):
        future = Future()
        future.set_result((compute(), None))
        self._track(states, future, device)

    monkeypatch.setattr(RefreshAhead, "submit", synchronous)
    reference, _, _ = _cuda_run("cuda", 12, _ahead)
    monkeypatch.setattr(RefreshAhead, "submit", slow_side_stream)
    background, _, _ = _cuda_run("cuda", 12, _ahead, pressure=True)
    for a, b in zip(reference, background):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
