"""What every suite writes: raw JSON, a markdown table, PNG plots, and the environment they ran in."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("torch", "deepspeed", "transformers", "pytorch-optimizer"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def write(out_dir: str | Path, suite: str, raw: dict[str, Any], markdown: str) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = {"suite": suite, "environment": environment(), **raw}
    (out / f"{suite}.json").write_text(json.dumps(raw, indent=2, default=float))
    (out / f"{suite}.md").write_text(markdown)
    return {"json": str(out / f"{suite}.json"), "markdown": str(out / f"{suite}.md")}


def line_plot(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
              title: str, hline: float | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, linewidth=1.4)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle=":", linewidth=1, label="AdamW final")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def bar_plot(path: str | Path, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
             reference: float | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle=":", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
