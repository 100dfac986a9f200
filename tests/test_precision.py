"""Our math runs with full IEEE fp32 matmuls whatever the user set (TF32 would leave 10 mantissa
bits to Gram products, rotations and Newton-Schulz); the user's setting comes back exactly, also
after an exception, and the refresh-ahead worker thread is pinned too."""
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ds_structopt as dso
from ds_structopt.optim import asgo, precision
from ds_structopt.optim.precision import full_fp32_matmul
from ds_structopt.optim.refresh import RefreshAhead

NEW_API = hasattr(torch._C, "_get_fp32_precision_getter")
PAIRS = [("generic", "all")] + [(b, o) for b in ("cuda", "mkldnn") for o in ("all", "matmul", "conv", "rnn")]
SHAPES = [(24, 40), (32, 32), (40, 24), (16, 48)]


def _state():
    """Every view of the setting; the legacy one refuses to read when the views disagree ("mixed")."""
    out = {pair: torch._C._get_fp32_precision_getter(*pair) for pair in PAIRS} if NEW_API else {}
    try:
        out["legacy"] = torch.get_float32_matmul_precision()
    except RuntimeError:
        out["legacy"] = "mixed"
    return out


def _set(backend, op, value):
    torch._C._set_fp32_precision_setter(backend, op, value)


@pytest.fixture(autouse=True)
def _torch_defaults_after():
    start = _state()
    yield
    torch.set_float32_matmul_precision("highest")
    if NEW_API:
        for pair in [("generic", "all"), ("cuda", "all"), ("mkldnn", "all"), ("cuda", "matmul"), ("mkldnn", "matmul")]:
            _set(*pair, "none")
    assert _state() == start and precision._depth == 0


USER_SETTINGS = {
    "default": lambda: None,
    "legacy high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy medium": lambda: torch.set_float32_matmul_precision("medium"),
    "allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
}
if NEW_API:
    USER_SETTINGS.update({
        "new cuda.matmul tf32": lambda: _set("cuda", "matmul", "tf32"),  # legacy view unreadable
        "new generic tf32": lambda: _set("generic", "all", "tf32"),
        "new generic tf32, cuda.matmul ieee": lambda: (_set("generic", "all", "tf32"), _set("cuda", "matmul", "ieee")),
        "new mkldnn.matmul bf16": lambda: _set("mkldnn", "matmul", "bf16"),
    })


def _pinned():
    full = torch.get_float32_matmul_precision() == "highest"
    if NEW_API:
        full = full and all(torch._C._get_fp32_precision_getter(b, "matmul") in ("none", "ieee") for b in ("cuda", "mkldnn"))
    return full


@pytest.mark.parametrize("setting", list(USER_SETTINGS))
def test_pins_full_precision_and_restores_exactly(setting):
    USER_SETTINGS[setting]()
    before = _state()
    with full_fp32_matmul():
        assert _pinned()
        with full_fp32_matmul():  # nested
            assert _pinned()
        assert _pinned()
    assert _state() == before
    with pytest.raises(KeyError):
        with full_fp32_matmul():
            raise KeyError("boom")
    assert _state() == before


def test_threads_share_the_pin_until_the_last_one_leaves():
    torch.set_float32_matmul_precision("high")
    inside, leave = threading.Event(), threading.Event()

    def worker():
        with full_fp32_matmul():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=worker)
    with full_fp32_matmul():
        t.start()
        assert inside.wait(10)
    assert _pinned()  # the worker is still inside
    leave.set()
    t.join(10)
    assert torch.get_float32_matmul_precision() == "high"


# ----- every family's step sees only "highest" at its matmuls / linalg calls ----------------------
MATMULS = {"mm", "bmm", "baddbmm", "addmm", "addbmm", "matmul", "dot", "mv"}


class _Recorder(TorchDispatchMode):
    """Records the fp32 matmul precision in force at every matmul and linalg op (per thread: modes are)."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS or "linalg" in name:
            self.seen.append((name, torch.get_float32_matmul_precision()))
        return func(*args, **(kwargs or {}))


FAMILIES = [
    ("AdaDiag", {}),
    ("AdaDiag++", {}),
    ("AdaDiag++", {"basis": "ema", "power_qr": True}),
    ("AdaDiag++", {"moments": "reproject", "factored": True}),
    ("AdaDiag++", {"refresh_from": "previous"}),
    ("AdaDiag++", {"basis": "ema", "refresh_from": "previous", "stagger_refresh": True}),
    ("ASGO", {}),  # newton_schulz
    ("ASGO", {"root": "eigh", "damping": 1e-4}),
    ("ASGO", {"root": "eigh", "damping": 1e-4, "refresh_from": "previous"}),
    ("DASGO", {}),
]


@pytest.mark.parametrize("name, opts", FAMILIES)
def test_every_family_computes_in_full_precision_under_a_tf32_user(name, opts, monkeypatch):
    main_seen, worker_seen = [], []
    gate = threading.Event()  # the worker computes only once the main thread has left the step
    original = RefreshAhead.submit

    def gated(self, states, compute, device, inputs=()):
        def wrapped():
            assert gate.wait(10)
            with _Recorder(worker_seen):
                return compute()
        return original(self, states, wrapped, device, inputs)

    monkeypatch.setattr(RefreshAhead, "submit", gated)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES] + [torch.nn.Parameter(torch.zeros(8))]
    cls = dso.get_optimizer_class(name)
    extra = {"update_freq": 2} if "update_freq" in cls.DEFAULTS else {}
    opt = cls(params, lr=1e-3, **extra, **opts)
    torch.set_float32_matmul_precision("high")  # the user's choice for their model
    for _ in range(5):
        gate.clear()
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        with _Recorder(main_seen):
            opt.step()
        gate.set()
        opt.settle()
        assert torch.get_float32_matmul_precision() == "high"
    if name != "DASGO":  # DASGO has no matmul
        assert main_seen
    if opts.get("refresh_from") == "previous":
        assert worker_seen  # the background decompositions were recorded (in the worker thread)
    assert {p for _, p in main_seen + worker_seen} <= {"highest"}, sorted(set(main_seen + worker_seen))


def test_user_setting_restored_when_the_step_raises(monkeypatch):
    from ds_structopt.optim import adadiag

    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    opt = dso.AdaDiagPP(params, lr=1e-3)
    torch.set_float32_matmul_precision("high")

    def broken(*args, **kwargs):
        assert _pinned()
        raise KeyError("broken rotation")

    monkeypatch.setattr(adadiag, "rotate", broken)
    for p in params:
        p.grad = torch.randn(p.shape)
    with pytest.raises(KeyError, match="broken rotation"):
        opt.step()
    assert torch.get_float32_matmul_precision() == "high" and precision._depth == 0


def test_user_setting_restored_when_the_worker_raises(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    opt = dso.ASGO(params, lr=1e-3, root="eigh", update_freq=2, refresh_from="previous")
    torch.set_float32_matmul_precision("high")

    def broken(preconds, damping):
        if not preconds:  # the in-place call of a step with nothing due
            return []
        assert _pinned()
        raise KeyError("broken eigh")

    def step():
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()

    step()  # roots of step 1, computed in place
    monkeypatch.setattr(asgo, "inverse_roots", broken)
    step()  # submits the roots due at step 3 to the worker, which raises there
    with pytest.raises(KeyError, match="broken eigh"):
        step()  # takes them
    assert torch.get_float32_matmul_precision() == "high" and precision._depth == 0
