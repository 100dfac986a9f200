"""Endurance: 2 ranks, 2000 steps with a checkpoint every 100, a rank killed at step 1050 and a
resume. Memory stays flat on EVERY rank (metrics.csv's rss_mb_ranks, a row every 10 steps): after
warm-up (300-1000 and 1300-2000), RSS grows < 5 % and its least-squares slope against the step is
below SLOPE_KIB_PER_STEP; no file handles leak, checkpoints rotate (keep last 3) and the resumed run
reaches the end. ~6-12 min: runs in CI, locally with DS_STRUCTOPT_SOAK=1."""
import json

import pytest
from test_faults import metrics, run

STEPS, KILL_AT, WORLD = 2000, 1050, 2
# Per rank, after warm-up. RSS on 2 CPU ranks does not drift, it steps: the allocator's high-water
# mark rises by 1-6 MB at a few random steps and mostly stays there. For the same code the slope
# over a window measured -4 .. 13.2 KiB/step run to run (CI: 9.5, 8.7, 13.2, 0.2; here 10.9, 2.1,
# 5.6 on 450-step windows; Python's own heap, traced with tracemalloc, grew 9 KiB in 200 steps).
# 20 KiB/step (14 MB over a 700-step window, 2.6 %) is 1.5x the largest of those: a steady leak
# of that size fails, the allocator's steps do not.
SLOPE_KIB_PER_STEP = 20.0


def slope_kib_per_step(steps, rss_mb):
    """Least-squares slope of RSS (MB) against the step, in KiB per step."""
    mean_x, mean_y = sum(steps) / len(steps), sum(rss_mb) / len(rss_mb)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(steps, rss_mb))
    return cov / sum((x - mean_x) ** 2 for x in steps) * 1024


def segment(rows, first, last):
    return [r for r in rows if first <= int(r["step"]) <= last]


@pytest.mark.soak
def test_soak_2000_steps_with_checkpoints_and_a_resume(tmp_path):
    out = tmp_path / "soak"
    common = ("--save-every", "100", "--keep-last", "3", "--log-every", "10", "--eval-every", "1000")
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
        steps = [int(r["step"]) for r in seg]
        by_rank = list(zip(*[[float(mb) for mb in r["rss_mb_ranks"].split()] for r in seg]))
        assert len(by_rank) == WORLD and [float(r["rss_mb"]) for r in seg] == list(by_rank[0]), seg[0]
        assert [float(r["rss_mb_max"]) for r in seg] == [max(mbs) for mbs in zip(*by_rank)]
        fds = [int(r["open_fds"]) for r in seg]  # rank 0's
        report[name] = {"fds": (min(fds), max(fds))}
        for rank, rss in enumerate(by_rank):
            slope = slope_kib_per_step(steps, rss)
            report[name][f"rank {rank}"] = {"rss_start_mb": rss[0], "rss_max_mb": max(rss),
                                            "slope_kib_per_step": round(slope, 2)}
        print(f"\nsoak, {name} (steps {warm}-{end}):", report[name])
        for rank, rss in enumerate(by_rank):
            assert max(rss) < 1.05 * rss[0], (name, rank, rss)
            assert report[name][f"rank {rank}"]["slope_kib_per_step"] < SLOPE_KIB_PER_STEP, (name, rank, rss)
        assert max(fds) - min(fds) <= 2, (name, fds)
    print("soak:", f"{first_seconds:.0f} s + {second_seconds:.0f} s")
