"""``ds-structopt`` console script: ``train`` (the LLaMA entry point) and ``validate`` (check a DeepSpeed JSON)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "train a LLaMA model (see: ds-structopt train --help)",
                "validate": "check a DeepSpeed JSON with a ds_structopt optimizer block"}
    if not args or args[0] not in commands:
        print("usage: ds-structopt {train,validate} ...\n" + "\n".join(f"  {k:9s} {v}" for k, v in commands.items()),
              file=sys.stderr)
        return 2
    if args[0] == "train":
        from .train import main as train_main

        train_main(args[1:])
        return 0
    from .integrations.deepspeed_config import main as validate_main

    return validate_main(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
