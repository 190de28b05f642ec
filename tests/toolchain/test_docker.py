"""The Dockerfile (no Docker engine needed): its stages, base image, arguments and what the final
image holds; everything it copies, runs and documents exists. tools/check_docker.sh builds it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER_FILES = ("Dockerfile", ".dockerignore", "tools/docker/build.sh", "tools/check_docker.sh")


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


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    out = {}
    for op, rest in instructions():
        if op == "FROM":
            break
        if op == "ARG":
            name, _, default = rest.partition("=")
            out[name] = default.strip('"')
    return out


def stages() -> list[dict]:
    """Each FROM and what follows it: {'name', 'from', 'ops': [(op, rest), ...]}."""
    out: list[dict] = []
    for op, rest in instructions():
        if op == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            out.append({"name": name, "from": words[0], "ops": []})
        elif out:
            out[-1]["ops"].append((op, rest))
    return out


def substitute(ref: str) -> str:
    args = global_args()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ref)


def chain(stage: dict) -> list[dict]:
    """The stage and the stages it is built FROM, nearest first."""
    by_name = {s["name"]: s for s in stages() if s["name"]}
    out = [stage]
    while substitute(out[-1]["from"]) in by_name:
        out.append(by_name[substitute(out[-1]["from"])])
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
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "VOLUME", "CMD", "LABEL", "USER", "ENTRYPOINT"}
    assert set(ops) <= known
    assert ops.count("FROM") >= 3, "a multi-stage build"


def test_only_a_debian_base_image():
    """Every stage starts from BASE (debian bookworm or trixie) or from an earlier stage: no NVIDIA
    or other registry image."""
    base = global_args().get("BASE")
    assert base in ("debian:bookworm", "debian:trixie"), base
    names: set[str] = set()
    for s in stages():
        ref = s["from"]
        assert ref == "${BASE}" or substitute(ref) in names, f"FROM {ref}: neither BASE nor an earlier stage"
        if s["name"]:
            names.add(s["name"])


def test_variant_argument_selects_a_cpu_or_cuda_final_stage():
    args = global_args()
    assert args.get("VARIANT") == "cuda"
    final = stages()[-1]
    assert final["from"] == "${VARIANT}"
    by_name = {s["name"]: s for s in stages() if s["name"]}
    assert {"cpu", "cuda"} <= set(by_name)
    for v in ("cpu", "cuda"):
        assert "runtime" in [s["name"] for s in chain(by_name[v])]
    cuda_env = " ".join(rest for op, rest in by_name["cuda"]["ops"] if op == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES" in cuda_env
    assert not [op for op, _ in by_name["cpu"]["ops"] if op != "ENV"], "the CPU image adds nothing to the runtime stage"


def test_final_image_holds_caffe_venv_and_project_but_no_build_tools():
    runtime = {s["name"]: s for s in stages()}["runtime"]
    assert substitute(runtime["from"]) == "base"
    copies = [rest for op, rest in runtime["ops"] if op == "COPY"]
    from_build = sorted(shlex.split(c)[1] for c in copies if c.startswith("--from=build"))
    assert from_build == ["/opt/caffe", "/work/redseg/.venv"]
    assert any(c == ". ." for c in copies)
    runs = " ".join(rest for op, rest in runtime["ops"] if op == "RUN")
    # Runtime packages come as .deb files from the debs stage, installed offline: no archive, no
    # compiler, no toolkit in this stage.
    assert "from=debs" in runs and "apt-get update" not in runs
    for word in ("g++", "cmake", "nvidia-cuda-toolkit", "pip install", "DEBIAN_MIRROR", "secret"):
        assert word not in runs, f"the runtime stage runs {word}"
    args = [rest.partition("=")[0] for op, rest in runtime["ops"] if op == "ARG"]
    assert args in ([], ["REDSEG_COMMIT"]), "build arguments show in the image's history"
    env = " ".join(rest for op, rest in runtime["ops"] if op == "ENV")
    for var in ("CAFFE_ROOT=/opt/caffe", "REDSEG_CACHE=", "HOME=", "LD_LIBRARY_PATH=/opt/caffe/build/lib"):
        assert var in env


def test_runs_and_data_are_volumes_any_uid_can_write_and_make_help_is_the_default():
    runtime = {s["name"]: s for s in stages()}["runtime"]
    ops = dict((op, rest) for op, rest in runtime["ops"] if op in ("VOLUME", "CMD"))
    assert '"/work/redseg/runs"' in ops["VOLUME"] and '"/work/redseg/data"' in ops["VOLUME"]
    assert ops["CMD"] == '["make", "help"]'
    runs = " ".join(rest for op, rest in runtime["ops"] if op == "RUN")
    assert "chmod 1777 runs data" in runs
    assert "make setup" in runs, "the image runs make setup once, so that it is a no-op for any uid"


def test_mirror_index_and_ca_are_build_arguments_or_secrets_of_the_build_stages():
    by_name = {s["name"]: s for s in stages() if s["name"]}
    for name in ("build", "debs"):
        ops = by_name[name]["ops"]
        assert any(op == "ARG" and rest.startswith("DEBIAN_MIRROR") for op, rest in ops)
        assert all("--mount=type=secret,id=ca" in rest for op, rest in ops if op == "RUN" and "build.sh" in rest)
    assert any(op == "ARG" and rest.startswith("PIP_INDEX_URL") for op, rest in by_name["build"]["ops"])


def test_no_host_name_is_written_into_the_docker_files():
    for name in DOCKER_FILES:
        text = (REPO / name).read_text()
        hosts = re.findall(r"[a-z][a-z0-9+.-]*://([A-Za-z0-9.-]+\.[A-Za-z]{2,})", text)
        assert not hosts, f"{name} names {hosts}: mirrors come from the machine's configuration"


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "models"):
        assert entry in ignored


def test_copied_files_and_make_targets_exist():
    targets = make_targets()
    assert {"help", "setup", "test", "demo", "data", "stage1", "stage2", "evaluate"} <= targets
    used = []
    for op, rest in instructions():
        if op == "COPY" and "--from" not in rest:
            for src in shlex.split(rest)[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        if op == "RUN":
            used += make_goals(rest.split(" ", 1)[1] if rest.startswith("--mount") else rest)
        if op == "CMD":
            used += make_goals(" ".join(re.findall(r'"([^"]*)"', rest)))
    assert "setup" in used and "help" in used
    for goal in used:
        assert goal in targets, f"the Dockerfile runs `make {goal}`, which the Makefile lacks"


def test_build_stage_runs_setup_with_the_cuda_switches():
    args = {}
    for op, rest in {s["name"]: s for s in stages()}["build"]["ops"]:
        if op == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    archs = args["CUDA_ARCH_BIN"].split()
    assert "61" in archs and "90" in archs, "Pascal (the paper's 1080Ti, sm_61) to Hopper (sm_90)"
    build = (REPO / "tools" / "docker" / "build.sh").read_text()
    assert "tools/setup.sh" in build and "CUDA=1" in build and "CUDA_ARCH_BIN" in build
    setup = (REPO / "tools" / "setup.sh").read_text()
    for var in ("CUDA_ROOT", "CUDA_ARCH_BIN", "CUDA_ARCH_PTX", "CUDA_WHEELS", "CUDA_HOST_COMPILER"):
        assert var in setup


def test_readme_docker_commands_use_existing_targets():
    readme = (REPO / "README.md").read_text()
    docs = (REPO / "docs" / "gpu.md").read_text()
    targets = make_targets()
    docker_lines = [line for line in (readme + docs).splitlines() if line.strip().startswith("docker run")]
    assert docker_lines, "README and docs/gpu.md document no docker run command"
    for line in docker_lines:
        m = re.search(r" redseg(:\w+)? (.*)$", line)
        for goal in make_goals(m.group(2) if m else ""):
            assert goal in targets, f"the docker command uses `make {goal}`: {line}"
