"""Staggered basis refresh: every matrix refreshes once per T-step window, at a phase chosen so each
step carries about the same decomposition cost; deterministic and carried through checkpoints."""
import io

import pytest
import torch

import ds_structopt as dso
from ds_structopt.optim.refresh import PhasePlanner, decomposition_cost, refresh_due

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
    costs = [decomposition_cost(m, n, True, True) for m, n in SHAPES]
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
        expected = sum(refresh_due(t, T, st["refresh_phase"]) for t in range(1, 2 * T + 2))
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
                                                refresh_ahead_steps=lead), 1 + T)
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
