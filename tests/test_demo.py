"""The README's main job, shortened: both optimizers train and report a held-out loss."""
import math

from ds_structopt import demo


def test_demo_runs_and_learns(capsys):
    results = demo.main(["--steps", "30", "--log-every", "10", "--batch-size", "8", "--seq-len", "64"])
    out = capsys.readouterr().out
    assert "AdaDiag++" in out and "AdamW" in out and "held-out loss" in out
    for name in ("AdaDiag++", "AdamW"):
        # uniform over 256 bytes is ln 256 = 5.55; 30 steps must learn byte statistics
        assert results[name]["eval_loss"] < math.log(256) - 1.0
