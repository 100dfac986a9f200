"""Run launch/megatron/pretrain_gpt.py on a CPU-only machine: install the test shim, then the script."""
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the CPU shim)

if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_cpu

    megatron_cpu.install()
    script = Path(__file__).resolve().parents[2] / "launch" / "megatron" / "pretrain_gpt.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
