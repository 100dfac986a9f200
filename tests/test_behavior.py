"""Optimizer contract: dtypes, shapes, param groups, checkpoints, counters, failures, bad input."""

import pytest
import torch
from torch import nn

import ds_structopt as dso
from ds_structopt.optim import batching, linalg

# every registered family with its defaults (a new family is covered by registering it), then variants
ALL = [(name, {}) for name in dso.OPTIMIZERS] + [
    ("AdaDiag", {"factored": True}),
    ("AdaDiag++", {"factored": True}),
    ("AdaDiag++", {"factored": True, "betas": (0.0, 0.999), "beta2_decay": -0.8, "relative_step": True}),
    ("AdaDiag++", {"basis": "ema", "power_qr": True}),
    ("AdaDiag++", {"moments": "reproject"}),
    ("AdaDiag++", {"moments": "reset"}),
    ("AdaDiag++", {"basis": "momentum", "moments": "reproject_both", "nonsquare": "small_side"}),
    ("ASGO", {"root": "eigh"}),
]
IDS = [f"{n}{o}" for n, o in ALL]


class Mixed(nn.Module):
    """Wide and tall linears, a conv (4-D weight), biases and a norm: every parameter kind."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.wide = nn.Linear(24, 8)   # weight 8 x 24 (m < n)
        self.tall = nn.Linear(8, 16)   # weight 16 x 8 (m > n)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))          # (b, 6)
        h = torch.cat([h, h, h, h], dim=1)                     # (b, 24)
        h = torch.tanh(self.wide(h))
        return self.head(self.norm(torch.tanh(self.tall(h))))


def make_data(seed=0, batch=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, 5, 5, generator=gen), torch.randn(batch, 3, generator=gen)


def train(model, opt, steps, data=None):
    x, y = data or make_data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x).float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def build(name, model, lr=1e-2, **opts):
    return dso.build(name, dso.param_groups(model), lr=lr, update_freq=3, **opts) if "update_freq" in dso.get_optimizer_class(name).DEFAULTS \
        else dso.build(name, dso.param_groups(model), lr=lr, **opts)


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_all_parameter_kinds_train(name, opts):
    torch.manual_seed(0)
    model = Mixed()
    opt = build(name, model, **opts)
    losses = train(model, opt, 15)
    assert losses[-1] < losses[0]
    for p in model.parameters():
        assert torch.isfinite(p).all()
    conv_state = opt.state[model.conv.weight]
    assert "step" in conv_state and conv_state["step"] == 15
    if name.startswith("AdaDiag"):
        assert conv_state["exp_avg"].shape == (6, 18) if "exp_avg" in conv_state else conv_state["row_sq"].shape == (6,)
        # 1-D params and the head went to AdamW (it has exp_avg_sq of the param's own shape)
        assert opt.state[model.norm.weight]["exp_avg_sq"].shape == (16,)


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_bf16_parameters(name, opts):
    torch.manual_seed(0)
    model = Mixed().to(torch.bfloat16)
    opt = build(name, model, **opts)
    x, y = make_data()
    losses = train(model, opt, 12, (x.bfloat16(), y))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                assert v.dtype == torch.float32


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_state_dict_round_trip_is_bit_identical(name, opts, tmp_path):
    torch.manual_seed(0)
    model = Mixed()
    opt = build(name, model, **opts)
    train(model, opt, 4)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    clone = Mixed()
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    clone.load_state_dict(ck["model"])
    opt2 = build(name, clone, **opts)
    opt2.load_state_dict(ck["opt"])
    train(model, opt, 5)
    train(clone, opt2, 5)
    for (n, a), b in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), n


def test_load_keeps_fp32_state_for_bf16_params_and_does_not_alias():
    model = Mixed().to(torch.bfloat16)
    opt = build("AdaDiag++", model)
    x, y = make_data()
    train(model, opt, 2, (x.bfloat16(), y))
    sd = opt.state_dict()
    opt2 = build("AdaDiag++", model)
    opt2.load_state_dict(sd)
    st = opt2.state[model.wide.weight]
    assert st["exp_avg"].dtype == torch.float32 and st["P"].dtype == torch.float32
    assert st["exp_avg"].data_ptr() != opt.state[model.wide.weight]["exp_avg"].data_ptr()


def test_param_groups_use_their_own_hyperparameters():
    """Two groups with different lr/update_freq == two separate single-group optimizers."""
    torch.manual_seed(0)
    ref = Mixed()
    model = Mixed()
    model.load_state_dict(ref.state_dict())
    a, b = [ref.wide.weight], [ref.tall.weight]
    opt_a = dso.AdaDiagPP(a, lr=3e-2, update_freq=2)
    opt_b = dso.AdaDiagPP(b, lr=1e-3, update_freq=5, betas=(0.8, 0.99))
    opt = dso.AdaDiagPP(
        [{"params": [model.wide.weight], "lr": 3e-2, "update_freq": 2},
         {"params": [model.tall.weight], "lr": 1e-3, "update_freq": 5, "betas": (0.8, 0.99)}]
    )
    x, y = make_data()
    for _ in range(6):
        for m, opts in ((ref, (opt_a, opt_b)), (model, (opt,))):
            for o in opts:
                o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            for o in opts:
                o.step()
    assert torch.equal(ref.wide.weight, model.wide.weight)
    assert torch.equal(ref.tall.weight, model.tall.weight)
    assert opt.state[model.wide.weight]["refreshes"] == 3 and opt.state[model.tall.weight]["refreshes"] == 2


def test_closure_is_called_with_grad_enabled():
    model = Mixed()
    opt = build("AdaDiag++", model)
    x, y = make_data()

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.requires_grad


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_nonfinite_gradient_is_skipped_and_counted(name, opts):
    torch.manual_seed(0)
    model = Mixed()
    opt = build(name, model, **opts)
    train(model, opt, 2)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[model.wide.weight].items()}
    weight = model.wide.weight.detach().clone()
    other = model.tall.weight.detach().clone()
    x, y = make_data()
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model.wide.weight.grad[0, 0] = float("nan")
    model.norm.bias.grad[1] = float("inf")
    opt.step()
    assert torch.equal(model.wide.weight, weight)
    assert not torch.equal(model.tall.weight, other)
    after = opt.state[model.wide.weight]
    for k, v in before.items():
        if k == "nonfinite_skips":
            assert after[k] == v + 1
        elif isinstance(v, torch.Tensor):
            assert torch.equal(after[k], v), k
        else:
            assert after[k] == v, k
    assert opt.stats()["nonfinite_skips"] == 2


def test_batched_and_unbatched_linear_algebra_agree(monkeypatch):
    """Stacking same-shape matrices is an implementation detail: chunks of one give the same result."""
    def run():
        torch.manual_seed(0)
        layers = nn.Sequential(*[nn.Linear(12, 12) for _ in range(4)], nn.Linear(12, 7))
        opt = dso.AdaDiagPP(dso.param_groups(layers), lr=1e-2, update_freq=2, basis="ema")
        x = torch.randn(16, 12)
        for _ in range(5):
            opt.zero_grad()
            layers(x).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in layers.parameters()]

    batched = run()
    monkeypatch.setattr(batching, "DEFAULT_MAX_STACK_BYTES", 1)
    single = run()
    for a, b in zip(batched, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----- decomposition failures ------------------------------------------------
def _failing(*args, **kwargs):
    raise torch.linalg.LinAlgError("injected failure")


def test_svd_failure_retries_in_fp64(monkeypatch):
    real = torch.linalg.svd
    calls = []

    def nan_in_fp32(x, full_matrices=True):
        calls.append(x.dtype)
        u, s, vh = real(x, full_matrices=full_matrices)
        return (u * float("nan"), s, vh) if x.dtype == torch.float32 else (u, s, vh)

    monkeypatch.setattr(linalg, "_svd", nan_in_fp32)
    w = nn.Parameter(torch.randn(5, 7))
    opt = dso.AdaDiagPP([w], lr=1e-2, basis="grad")  # the SVD route
    w.grad = torch.randn(5, 7)
    opt.step()
    st = opt.state[w]
    assert torch.float64 in calls
    assert st["refreshes"] == 1 and st["decomp_failures"] == 0
    assert st["P"].dtype == torch.float32 and torch.isfinite(st["P"]).all()


def test_failure_chain_keeps_basis_then_falls_back_to_identity(monkeypatch):
    w = nn.Parameter(torch.randn(5, 7))
    opt = dso.AdaDiagPP([w], lr=1e-2, update_freq=1, max_decomp_failures=3, basis="grad")  # the SVD route
    w.grad = torch.randn(5, 7)
    opt.step()
    st = opt.state[w]
    good_p = st["P"].clone()
    monkeypatch.setattr(linalg, "_svd", _failing)
    for k in range(2):  # failures 1 and 2: previous basis kept, counted
        w.grad = torch.randn(5, 7)
        opt.step()
        assert torch.equal(st["P"], good_p)
        assert st["decomp_failures"] == k + 1 and st["identity_fallbacks"] == 0
    with pytest.warns(RuntimeWarning, match="identity basis"):
        w.grad = torch.randn(5, 7)
        opt.step()
    assert torch.equal(st["P"], torch.eye(5)) and torch.equal(st["Q"], torch.eye(7))
    assert st["identity_fallbacks"] == 1 and opt.stats()["decomp_failures"] == 3
    monkeypatch.undo()
    w.grad = torch.randn(5, 7)
    opt.step()  # decompositions work again: a real basis comes back
    assert st["consecutive_failures"] == 0 and not torch.equal(st["P"], torch.eye(5))
    assert torch.isfinite(w).all()


def test_first_refresh_failure_uses_identity(monkeypatch):
    monkeypatch.setattr(linalg, "_eigh", _failing)
    w = nn.Parameter(torch.randn(4, 6))
    opt = dso.AdaDiag([w], lr=1e-2, basis="ema")
    w.grad = torch.randn(4, 6)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(opt.state[w]["P"], torch.eye(4))
    assert torch.isfinite(w).all()


def test_asgo_eigh_root_failure_chain(monkeypatch):
    w = nn.Parameter(torch.randn(4, 6))
    opt = dso.ASGO([w], root="eigh", update_freq=1, max_decomp_failures=2)
    w.grad = torch.randn(4, 6)
    opt.step()
    good = opt.state[w]["root"].clone()
    monkeypatch.setattr(linalg, "_eigh", _failing)
    w.grad = torch.randn(4, 6)
    opt.step()
    assert torch.equal(opt.state[w]["root"], good)
    with pytest.warns(RuntimeWarning, match="identity"):
        w.grad = torch.randn(4, 6)
        opt.step()
    assert torch.equal(opt.state[w]["root"], torch.eye(4))
    assert opt.stats()["decomp_failures"] == 2


# ----- bad input ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(dso.OPTIMIZERS))
@pytest.mark.parametrize("kwargs,word", [
    ({"lr": -1.0}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": (-0.1, 0.9)}, "betas"),
    ({"betas": 0.9}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"learning_rate": 1e-3}, "learning_rate"),
    ({"max_precond_dim": -1}, "max_precond_dim"),
])
def test_bad_common_options(name, kwargs, word):
    with pytest.raises(ValueError, match=word):
        dso.build(name, [nn.Parameter(torch.zeros(2, 2))], **kwargs)


@pytest.mark.parametrize("name,kwargs,word", [
    ("AdaDiag", {"update_freq": 0}, "update_freq"),
    ("AdaDiag++", {"update_freq": 1.5}, "update_freq"),
    ("AdaDiag++", {"basis": "svd"}, "basis"),
    ("AdaDiag++", {"moments": "reprojected"}, "moments"),
    ("AdaDiag++", {"nonsquare": "smallside"}, "nonsquare"),
    ("AdaDiag++", {"basis": "momentum", "betas": (0.0, 0.99)}, "basis"),
    ("AdaDiag++", {"basis": "momentum", "refresh_from": "previous"}, "basis"),
    ("AdaDiag++", {"updat_freq": 10}, "did you mean 'update_freq'"),
    ("AdaDiag++", {"preset": "papers"}, "preset must be one of \\['paper'\\], got 'papers'"),
    ("ASGO", {"preset": "paper"}, "preset must be unset"),
    ("AdaDiag", {"relative_step": True}, "relative_step"),
    ("AdaDiag", {"beta2_decay": 0.8}, "beta2_decay"),
    ("ASGO", {"root": "cholesky"}, "root"),
    ("ASGO", {"update_freq": 0}, "update_freq"),
    ("ASGO", {"factored": True}, "factored"),
    ("DASGO", {"update_freq": 10}, "update_freq"),
])
def test_bad_family_options(name, kwargs, word):
    with pytest.raises(ValueError, match=word):
        dso.build(name, [nn.Parameter(torch.zeros(2, 2))], **kwargs)


@pytest.mark.parametrize("name", ["AdaDiag", "AdaDiag++"])
def test_paper_preset_is_the_papers_reading_and_explicit_options_win(name):
    cls = dso.get_optimizer_class(name)
    paper = cls.resolve_options({"preset": "paper"})
    assert (paper["basis"], paper["moments"], paper["nonsquare"], paper["betas"]) == ("grad", "rotated", "both",
                                                                                      (0.9, 0.999))
    assert cls.resolve_options({"preset": "paper", "moments": "reproject"})["moments"] == "reproject"
    assert "preset" not in paper  # resolved into options: checkpoints and configs hold the values


def test_bad_group_options_are_named():
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="lr"):
        dso.AdaDiagPP([{"params": [p], "lr": -1}])
    with pytest.raises(ValueError, match="did you mean 'update_freq'"):
        dso.AdaDiagPP([{"params": [p], "update_frequency": 5}])
    with pytest.raises(ValueError, match="unknown optimizer type 'Adam\\+\\+'"):
        dso.get_optimizer_class("Adam++")


def test_stats_and_state_bytes():
    model = Mixed()
    opt = build("AdaDiag++", model)
    train(model, opt, 1)
    stats = opt.stats()
    assert stats["refreshes"] == 4  # conv, wide, tall, head (not "lm_head": structured)
    expected = 0
    for st in opt.state.values():
        expected += sum(v.numel() * 4 for v in st.values() if isinstance(v, torch.Tensor))
    assert stats["state_bytes"] == expected > 0


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_all_zero_gradient_is_like_no_gradient(name, opts):
    """DeepSpeed's fp16/bf16 wrappers call step() once with zero gradients to create state:
    that must neither move weights (no NaN from normalizing a zero update) nor count as step 1."""
    torch.manual_seed(0)
    model = Mixed()
    opt = build(name, model, weight_decay=0.1, **opts)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all("step" not in opt.state[p] for p in model.parameters())
    train(model, opt, 2)
    assert opt.state[model.wide.weight]["step"] == 2


SCRATCH_CASES = ALL + [
    ("AdaDiag++", {"refresh_from": "previous", "basis": "grad"}),
    ("ASGO", {"root": "eigh", "refresh_from": "previous"}),
    ("AdaDiag++", {"factored": True, "betas": (0.0, 0.999)}),
]


@pytest.mark.parametrize("name,opts", SCRATCH_CASES, ids=[f"{n}{o}" for n, o in SCRATCH_CASES])
def test_scratch_gradients_give_bit_identical_updates_written_in_place(name, opts):
    """``matrix_updates(scratch=True)`` (a distributed owner's own gradient buffers) must give
    exactly the updates and states of the default, and return the gradient tensors themselves
    as updates (that is the memory it saves: planning/step_memory.py counts on it)."""
    cls = dso.get_optimizer_class(name)
    extra = {"update_freq": 2} if "update_freq" in cls.DEFAULTS else {}
    shapes = [(8, 24), (8, 24), (16, 8), (12, 12)]
    runs = {}
    for scratch in (False, True):
        opt = cls([torch.zeros(1)], lr=1e-2, **extra, **opts)
        group, states = opt.param_groups[0], [{} for _ in shapes]
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(s, generator=gen) for s in shapes]
        out = []
        for _ in range(5):  # first bases, plain steps, refreshes
            grads = [torch.randn(s, generator=gen) for s in shapes]
            given = [g.clone() for g in grads]
            updates, sizes = opt.matrix_updates(group, given, states, weights=weights, scratch=scratch)
            if scratch:
                assert all(u.data_ptr() == g.data_ptr() for u, g in zip(updates, given))
            else:
                assert all(torch.equal(g, h) for g, h in zip(given, grads))  # the caller's gradients untouched
            out.append(([u.clone() for u in updates], sizes))
        opt.settle()
        runs[scratch] = (out, states)
    (plain, plain_states), (inplace, inplace_states) = runs[False], runs[True]
    for (u0, s0), (u1, s1) in zip(plain, inplace):
        assert all(torch.equal(a, b) for a, b in zip(u0, u1))
        assert torch.equal(torch.as_tensor(s0), torch.as_tensor(s1))
    for a, b in zip(plain_states, inplace_states):
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), key
