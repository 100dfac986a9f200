"""The guard against a silent fallback to Adam, as the dist tests check it on every rank's metrics."""
from __future__ import annotations


def assert_structured_every_step(metrics: list[dict], matrices: int, steps: int | None,
                                 elementwise: int | None = None, name: str = "") -> None:
    """After ``steps`` optimizer steps: the model has ``matrices`` eligible matrices, each got the
    structured update in the last step and once per optimizer step over the run (summed over one
    replica group's owners), every rank counted ``steps`` steps (not micro-batches; None: whatever
    the run made, at least one), and AdamW
    stepped ``elementwise`` parameters in the last step."""
    replicas = int(metrics[0].get("replica_groups", 1))
    steps = steps if steps is not None else metrics[0]["optimizer_steps"]  # None: as many as the run made (> 0)
    assert steps > 0, name
    assert [m["eligible_matrices"] for m in metrics] == [matrices] * len(metrics), name
    assert [m["optimizer_steps"] for m in metrics] == [steps] * len(metrics), (name, [m["optimizer_steps"] for m in metrics])
    assert sum(m["structured_updates"] for m in metrics) == matrices * replicas, (name, [m["structured_updates"] for m in metrics])
    assert sum(m["structured_updates_total"] for m in metrics) == matrices * replicas * steps, name
    if elementwise is not None:
        assert [m["elementwise_updates"] for m in metrics] == [elementwise] * len(metrics), name
