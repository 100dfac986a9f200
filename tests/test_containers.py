"""docker/Dockerfile and docker/ds_structopt.def, checked statically.

No container engine runs on this machine and no registry is reachable, so the
images are not built here. What can be checked is checked: both files parse,
the base image is pinned to constraints.txt's torch, everything they copy
exists, they install with README.md's command, and their health check (the
same module) passes in this environment.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
APPTAINER = ROOT / "docker" / "ds_structopt.def"
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "ADD", "HEALTHCHECK", "CMD", "ENTRYPOINT", "LABEL",
                "USER", "EXPOSE", "VOLUME", "SHELL", "STOPSIGNAL", "ONBUILD"}
SECTIONS = {"labels", "files", "environment", "post", "test", "runscript", "startscript", "help", "setup", "arguments"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword, rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def apptainer_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    header, sections, current = {}, {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections[current] = []
        elif current is not None:
            if line and not line.startswith("#"):
                sections[current].append(line)
        elif line and not line.startswith("#"):
            key, sep, value = line.partition(":")
            assert sep, f"bad header line {line!r}"
            header[key.strip()] = value.strip()
    return header, sections


def torch_pin() -> str:
    return re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)


def readme_install_command() -> str:
    """The one 'pip install -c constraints.txt ...' line README.md gives for existing environments."""
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.strip().startswith("pip install -c constraints.txt")]
    assert len(lines) == 1, lines
    return lines[0]


def test_dockerfile_parses_and_pins_its_base():
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    assert {k for k, _ in steps} <= INSTRUCTIONS, {k for k, _ in steps} - INSTRUCTIONS
    assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE_IMAGE}")
    base = steps[0][1].split("=", 1)[1]
    repo, _, tag = base.partition(":")
    assert repo == "pytorch/pytorch" and tag.startswith(torch_pin() + "-cuda") and tag.endswith("-devel"), base
    # everything it copies is in the checkout, and constraints.txt travels with the package
    copied = [s for k, a in steps if k == "COPY" for s in shlex.split(a)[:-1]]
    assert "constraints.txt" in copied and "ds_structopt" in copied
    assert all((ROOT / s).exists() for s in copied), copied
    run = " ".join(a for k, a in steps if k == "RUN")
    assert readme_install_command() in run
    health = [a for k, a in steps if k == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD python -m ds_structopt.healthcheck" in health[0]


def test_apptainer_definition_matches_the_dockerfile():
    header, sections = apptainer_sections(APPTAINER.read_text())
    assert set(sections) <= SECTIONS, set(sections) - SECTIONS
    assert header["Bootstrap"] == "docker"
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    assert header["From"] == steps[0][1].split("=", 1)[1]  # same pinned base as the Dockerfile
    sources = [ln.split()[0] for ln in sections["files"]]
    assert "constraints.txt" in sources and all((ROOT / s).exists() for s in sources), sources
    assert readme_install_command() in sections["post"]
    assert sections["test"] == ["python -m ds_structopt.healthcheck"]
    assert any("ds_structopt.train" in ln for ln in sections["runscript"])
    # the same system packages in both images
    apt = re.compile(r"apt-get install -y --no-install-recommends ([\w\- .]+?)(?:\s*&&|$)", re.M)
    docker_pkgs = apt.search(" ".join(a for k, a in steps if k == "RUN")).group(1).split()
    def_pkgs = apt.search("\n".join(sections["post"])).group(1).split()
    assert docker_pkgs == def_pkgs


def test_slurm_script_runs_the_apptainer_image():
    text = (ROOT / "launch" / "slurm" / "torchrun.sbatch").read_text()
    assert "CONTAINER=" in text and "docker/ds_structopt.def" in (ROOT / "launch" / "slurm" / "common.sh").read_text()


def test_healthcheck_passes_here():
    proc = subprocess.run([sys.executable, "-m", "ds_structopt.healthcheck"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert len(ok) == 3 and "accelerator cpu, backend gloo" in proc.stdout


def test_healthcheck_fails_on_a_version_mismatch(tmp_path, monkeypatch):
    from ds_structopt import healthcheck

    monkeypatch.setattr(healthcheck, "_pins", lambda: {"torch": "0.0.1"})
    with pytest.raises(RuntimeError, match=r"torch .* \(constraints.txt pins 0.0.1\)"):
        healthcheck.check_versions()
