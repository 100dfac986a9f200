"""The LLaMA shapes shipped in ``configs/models`` (GaLore/AdaDiag LLaMA-on-C4 sizes) as configs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def model_file(name: str) -> Path:
    """``name`` as a path when it ends in .json, else ``configs/models/<name>.json``."""
    return Path(name) if name.endswith(".json") else CONFIG_DIR / "models" / f"{name}.json"


def model_config(name: str, vocab_size: int, seq_len: int) -> Any:
    """A ``LlamaConfig`` of a shipped size or a JSON file, with the tokenizer's vocabulary and room
    for ``seq_len`` positions."""
    from transformers import LlamaConfig

    path = model_file(name)
    if not path.exists():
        raise FileNotFoundError(f"model config not found: {path} (names: "
                                f"{sorted(p.stem for p in (CONFIG_DIR / 'models').glob('*.json'))})")
    cfg = json.loads(path.read_text())
    cfg.update(vocab_size=vocab_size, max_position_embeddings=max(seq_len, cfg.get("max_position_embeddings", 0)))
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    return LlamaConfig(**cfg)
