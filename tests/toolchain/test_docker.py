"""The Dockerfile (no Docker engine needed): everything it copies, runs and documents exists."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def make_targets() -> set[str]:
    proc = subprocess.run(["make", "-pRrq", "-f", str(REPO / "Makefile")], capture_output=True, text=True, cwd=REPO)
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z0-9_-]+):", proc.stdout, re.M)}


def make_goals(command: str) -> list[str]:
    """The targets of every `make ...` in a shell command (VAR=value arguments skipped)."""
    goals = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        if words and words[0] == "make":
            goals += [w for w in words[1:] if "=" not in w and not w.startswith("-")]
    return goals


def test_dockerfile_is_well_formed():
    ops = [op for op, _ in instructions()]
    assert ops.count("FROM") >= 1 and ops[-1] == "CMD"
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "VOLUME", "CMD", "LABEL", "USER", "ENTRYPOINT"}
    assert set(ops) <= known


def test_copied_files_and_make_targets_exist():
    targets = make_targets()
    assert {"setup", "test", "demo", "data", "stage1", "stage2", "evaluate"} <= targets
    used = []
    for op, rest in instructions():
        if op == "COPY" and "--from" not in rest:
            for src in shlex.split(rest)[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        if op == "RUN":
            used += make_goals(rest)
        if op == "CMD":
            used += make_goals(" ".join(re.findall(r'"([^"]*)"', rest)))
    assert "setup" in used
    for goal in used:
        assert goal in targets, f"the Dockerfile runs `make {goal}`, which the Makefile lacks"


def test_setup_is_what_the_image_runs_and_takes_cuda_switches():
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert "CUDA=1" in runs and "CUDA_ARCH_BIN" in runs
    setup = (REPO / "tools" / "setup.sh").read_text()
    for var in ("CUDA_ROOT", "CUDA_ARCH_BIN", "CUDA_ARCH_PTX"):
        assert var in setup


def test_readme_docker_commands_use_existing_targets():
    readme = (REPO / "README.md").read_text()
    targets = make_targets()
    docker_lines = [line for line in readme.splitlines() if line.strip().startswith("docker run")]
    assert docker_lines, "README documents no docker run command"
    for line in docker_lines:
        after_image = line.split(" redseg ", 1)[1] if " redseg " in line else ""
        for goal in make_goals(after_image):
            assert goal in targets, f"README's docker command uses `make {goal}`"
