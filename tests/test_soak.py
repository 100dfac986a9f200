"""Endurance: 2 ranks, 2000 steps with a checkpoint every 100, a rank killed at step 1050 and a
resume. Memory stays flat (RSS growth < 5 % after warm-up), no file handles leak, checkpoints rotate
(keep last 3) and the resumed run reaches the end. ~6 min: runs in CI, locally with DS_STRUCTOPT_SOAK=1."""
import json

import pytest

from test_faults import metrics, run

STEPS, KILL_AT = 2000, 1050


def segment(rows, first, last):
    return [r for r in rows if first <= int(r["step"]) <= last]


@pytest.mark.soak
def test_soak_2000_steps_with_checkpoints_and_a_resume(tmp_path):
    out = tmp_path / "soak"
    common = ("--save-every", "100", "--keep-last", "3", "--log-every", "50", "--eval-every", "1000")
    code, log, first_seconds = run(out, *common, faults=f"kill:rank=1,step={KILL_AT}", steps=STEPS, timeout=1800)
    assert code != 0 and f"at step {KILL_AT}" in log, log[-3000:]
    code, log, second_seconds = run(out, "--resume", *common, steps=STEPS, timeout=1800)
    assert code == 0, log[-3000:]
    assert "resumed from" in log and "step00001000" in log
    assert json.loads((out / "result.json").read_text())["final"]["step"] == STEPS
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == ["step00001800", "step00001900", "step00002000"], tags
    rows = metrics(out)
    report = {}
    for name, (warm, end) in {"before the kill": (300, 1000), "after the resume": (1300, STEPS)}.items():
        seg = segment(rows, warm, end)
        rss = [float(r["rss_mb"]) for r in seg]
        fds = [int(r["open_fds"]) for r in seg]
        report[name] = {"rss_start_mb": rss[0], "rss_max_mb": max(rss), "fds": (min(fds), max(fds))}
        assert max(rss) < 1.05 * rss[0], (name, rss)
        assert max(fds) - min(fds) <= 2, (name, fds)
    print("\nsoak:", report, f"{first_seconds:.0f} s + {second_seconds:.0f} s")
