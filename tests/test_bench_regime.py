"""The paper-regime convergence suite (`ds-structopt bench regime`): the ratios it derives, lr
bracketing, seeds, the run cache a rerun resumes from, and the summary's per-seed ratios."""
import json

import pytest

import ds_structopt as dso
from ds_structopt.bench import regime
from ds_structopt.bench.__main__ import main as bench


def test_derived_settings_have_the_papers_ratios():
    r = regime.Regime(seq_len=128, micro_batch=8)
    params = 1_870_000
    s = regime.derive(r, params)
    got = regime.ratios(s, params)
    assert s.batch % 8 == 0 and s.micro_batch == 8
    assert got["tokens_per_step_per_param"] == pytest.approx(0.002, rel=0.15)
    assert 2.0 <= got["tokens_per_param"] < 2.2 + 0.01
    assert got["refreshes"] >= 40
    explicit = regime.derive(regime.Regime(steps=10_000, batch=512, update_freq=200, seq_len=256), 60_000_000)
    assert (explicit.steps, explicit.batch, explicit.update_freq) == (10_000, 512, 200)  # the paper's 60M run


@pytest.mark.parametrize("optimum, expected_calls", [(2e-3, 3), (16e-3, 6), (0.25e-3, 6)])
def test_bracketing_extends_past_an_edge_optimum(optimum, expected_calls):
    calls = []

    def loss_at(lr):
        calls.append(lr)
        return abs(lr / optimum - 1)  # V-shaped around the optimum

    best, bracketed = regime.bracket(loss_at, (1e-3, 2e-3, 4e-3), max_extend=3)
    assert best == pytest.approx(optimum) and bracketed
    assert len(calls) == expected_calls, calls


def test_bracketing_stops_after_max_extend_and_says_so():
    best, bracketed = regime.bracket(lambda lr: -lr, (1e-3, 2e-3), max_extend=2)  # always better higher
    assert best == pytest.approx(8e-3) and not bracketed


def test_diverged_edge_counts_as_worse():
    best, bracketed = regime.bracket(lambda lr: float("inf") if lr > 3e-3 else 1 / lr, (1e-3, 2e-3, 4e-3), 3)
    assert best == 2e-3 and bracketed


def _run(opt, lr, seed, finals):
    """A synthetic run whose eval loss falls linearly from 5 to ``finals`` over 10 steps."""
    hist = [{"step": k, "seconds": float(k), "eval_loss": 5 - (5 - finals) * k / 10} for k in range(0, 11, 2)]
    hist[-1]["eval_loss"] = finals  # exactly, as a real run's last eval is its final loss
    return {"optimizer": opt, "lr": lr, "seed": seed, "final_eval_loss": finals, "diverged": False,
            "history": hist, "state_bytes": {"total": 8, "matrices_rotations": 0, "matrices_other": 4},
            "params": 1, "matrix_params": 1}


def test_summary_ratios_per_seed_against_the_better_adamw():
    runs = [_run("AdamW", 1e-3, 0, 3.0), _run("AdamW", 1e-3, 1, 3.2),
            _run("AdamW b2=0.95", 1e-3, 0, 2.9), _run("AdamW b2=0.95", 1e-3, 1, 3.1),
            _run("X", 2e-3, 0, 1.0), _run("X", 2e-3, 1, 2.0), _run("X", 4e-3, 0, 0.5)]
    best = {n: {"lr": lr, "bracketed": True} for n, lr in (("AdamW", 1e-3), ("AdamW b2=0.95", 1e-3), ("X", 2e-3))}
    out = regime.summarize(runs, best)
    assert out["target"] == "AdamW b2=0.95" and out["target_eval_loss"] == pytest.approx(3.0)
    x = out["best"]["X"]
    # seed 0: X reaches 2.9 at step 10*(5-2.9)/4 = 5.25 of AdamW b2=0.95's 10; seed 1: 3.1 at 10*1.9/3 = 6.33
    assert x["steps_ratio_per_seed"] == pytest.approx([0.525, 1.9 / 3])
    assert x["steps_ratio_spread"] == pytest.approx([0.525, 1.9 / 3])
    assert x["steps_ratio"] == pytest.approx((0.525 + 1.9 / 3) / 2)
    assert x["faster_than_target_on_every_seed"] and x["final_eval_loss"] == pytest.approx(1.5)
    assert out["best"]["AdamW"]["steps_ratio"] is None  # 0.999 never reaches 0.95's loss on either seed
    assert x["time_ratio_same_host"] is None  # no step timing given
    timed = regime.summarize(runs, best, {"AdamW": 0.1, "AdamW b2=0.95": 0.2, "X": 0.5})["best"]
    assert timed["X"]["time_ratio_same_host"] == pytest.approx(x["steps_ratio"] * 0.5 / 0.2)
    assert timed["AdamW b2=0.95"]["time_ratio_same_host"] == pytest.approx(1.0)
    assert timed["AdamW"]["time_ratio_same_host"] is None and timed["AdamW"]["step_seconds"] == 0.1


def untimed(summary):
    """The summary without this invocation's step timings (they change from run to run)."""
    return {**summary, "best": {n: {k: v for k, v in row.items() if k not in ("step_seconds", "time_ratio_same_host")}
                                for n, row in summary["best"].items()}}


def test_quick_suite_runs_the_protocol_and_a_rerun_takes_every_run_from_the_cache(tmp_path, capsys):
    assert bench(["regime", "--quick", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "convergence_regime.json").read_text())
    names = set(regime.QUICK_OPTIMIZERS)
    assert set(raw["summary"]["best"]) == names
    for name, row in raw["summary"]["best"].items():
        seeds = sorted(r["seed"] for r in raw["runs"] if r["optimizer"] == name and r["lr"] == row["best_lr"])
        assert seeds == [0, 1], (name, seeds)
        lrs = sorted(r["lr"] for r in raw["runs"] if r["optimizer"] == name and r["seed"] == 0)
        assert len(lrs) >= 3 and row["lr_bracketed"] == (lrs[0] < row["best_lr"] < lrs[-1]), (name, lrs)
    target = raw["summary"]["target"]
    assert raw["summary"]["best"][target]["steps_ratio"] == pytest.approx(1.0)
    assert raw["summary"]["best"][target]["time_ratio_same_host"] == pytest.approx(1.0)
    assert all(row["step_seconds"] > 0 for row in raw["summary"]["best"].values())
    first = capsys.readouterr().out
    trained = len(raw["runs"])
    assert f"{trained} runs trained, 0 taken" in first and "eval" in first  # a progress line per eval
    assert (tmp_path / "convergence_regime_loss_vs_steps.png").stat().st_size > 5000

    assert bench(["regime", "--quick", "--out", str(tmp_path)]) == 0
    again = capsys.readouterr().out
    assert f"0 runs trained, {trained} taken" in again
    assert untimed(json.loads((tmp_path / "convergence_regime.json").read_text())["summary"]) == untimed(raw["summary"])

    # a run made with other options (e.g. before a default changed) is not reused: retrained and replaced
    stale = json.loads((tmp_path / "convergence_regime.json").read_text())
    victim = next(r for r in stale["runs"] if r["optimizer"] == "AdaDiag++" and r["seed"] == 1)
    moments = f'"moments": "{dso.AdaDiagPP.DEFAULTS["moments"]}"'
    assert moments in victim["options"] and '"lr"' not in victim["options"]  # every option but lr is recorded
    victim["options"] = victim["options"].replace(moments, '"moments": "reset"')
    (tmp_path / "convergence_regime.json").write_text(json.dumps(stale))
    assert bench(["regime", "--quick", "--out", str(tmp_path)]) == 0
    assert f"1 runs trained, {trained - 1} taken" in capsys.readouterr().out
    fresh = json.loads((tmp_path / "convergence_regime.json").read_text())
    assert len(fresh["runs"]) == trained
    again_row, first_row = fresh["summary"]["best"]["AdaDiag++"], raw["summary"]["best"]["AdaDiag++"]
    assert again_row["final_eval_loss"] == first_row["final_eval_loss"]  # CPU runs are deterministic

    # an ablation screen at AdaDiag++'s best lr: the variant runs that lr on every seed, the targets
    # come from the cache, and the full protocol's summary and table are kept beside the screen's
    lr = raw["summary"]["best"]["AdaDiag++"]["best_lr"]
    args = ["regime", "--quick", "--out", str(tmp_path), "--fixed-lr", str(lr)]
    assert bench(args + ["--seeds", "1", "--optimizers", "AdamW", "AdamW b2=0.95", "AdaDiag++", "AdaDiag++ reset"]) == 0
    assert "1 runs trained" in capsys.readouterr().out  # AdaDiag++ reset on seed 0 (a 1-seed screen); the rest cached
    assert bench(args + ["--optimizers", "AdamW", "AdamW b2=0.95", "AdaDiag++", "AdaDiag++ reset"]) == 0
    assert "1 runs trained" in capsys.readouterr().out  # seed 1 added; seed 0 from the cache
    screened = json.loads((tmp_path / "convergence_regime.json").read_text())
    assert untimed(screened["summary"]) == untimed(raw["summary"])
    ablation = screened["ablation_summary"]["best"]
    assert ablation["AdaDiag++ reset"]["best_lr"] == lr and ablation["AdaDiag++ reset"]["lr_bracketed"] is None
    assert ablation["AdaDiag++ reset"]["seeds"] == 2
    assert untimed(screened["ablation_summary"])["best"]["AdamW"] == untimed(raw["summary"])["best"]["AdamW"]  # targets keep their protocol
    assert "| AdaDiag++ reset | " in (tmp_path / "convergence_regime_ablation.md").read_text()
    assert "AdaDiag++ reset" not in (tmp_path / "convergence_regime.md").read_text()


def test_cache_with_other_settings_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "convergence_regime.json").write_text(json.dumps({"settings": {"regime": {}, "train": {}}, "runs": []}))
    assert bench(["regime", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "other training settings" in err and "batch" in err and "\n" not in err


def test_suite_needs_a_target_optimizer(tmp_path, capsys):
    assert bench(["regime", "--quick", "--out", str(tmp_path), "--optimizers", "AdaDiag++"]) == 2
    assert "needs AdamW or AdamW b2=0.95" in capsys.readouterr().err


def test_state_split_counts_bases_with_the_factors_they_come_from():
    """'bases/factors' holds P, Q and the EMA factors L, R (as SOAP's column holds its GG):
    basis="ema"'s L, R are as large as P, Q; the moments ('other') are the same as the paper's."""
    import torch

    from ds_structopt.bench import convergence, optimizers

    s = convergence.Settings(model="tiny", data=("embedded",), seq_len=16)
    data = convergence.load_data(s)
    split = {}
    for name in ("AdaDiag++", "AdaDiag++ paper"):
        torch.manual_seed(0)
        model = convergence.build_model(s, data.vocab_size)
        opt = optimizers.build(regime.contender(name), model, 1e-3, update_freq=5)
        model(data.train[:2, :-1].long()).logits.float().mean().backward()
        opt.step()
        split[name] = convergence.state_split(opt)
    ema, paper = split["AdaDiag++"], split["AdaDiag++ paper"]
    assert ema["matrices_rotations"] == 2 * paper["matrices_rotations"] > 0
    assert ema["matrices_other"] == paper["matrices_other"]


def test_options_of_an_optimizer_that_counts_steps_in_its_groups_do_not_change_with_training():
    """pytorch-optimizer's Muon keeps ``step`` in its param groups: recorded after training, it made
    every cached Muon run differ from a fresh build and retrain on each rerun."""
    import torch

    from ds_structopt.bench import optimizers as contenders

    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    opt = contenders.build(regime.contender("Muon"), model, 0.02)
    before = opt.options()
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    assert any("step" in g for g in opt.parts[0].param_groups)  # the counter is there...
    assert opt.options() == before  # ...and not an option
