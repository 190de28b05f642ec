#!/usr/bin/env bash
# tools/check_docker.sh [cpu|cuda|all]: build the Docker image variants here and check them.
#
# Optional; not part of CI (like tools/check_fresh_system.sh). Tags redseg:cpu and redseg:cuda, built
# from this repository's committed HEAD (git archive: no local venv, runs or uncommitted work), then:
#   cpu   make test and make demo in the container, as the calling user, with runs/ mounted from
#         this machine, and the demo's metrics.json compared key for key with a host run's
#         (HOST_METRICS; the numbers must agree to METRICS_TOL, meta's times and paths may differ);
#         make setup as another uid is a quick no-op; the default command is make help
#   cuda  make setup as any uid (a no-op), import caffe, a CUDA build (libcaffe calls the CUDA
#         runtime), and asking for a GPU without one: the project's message, not Caffe's abort
# and prints the images' sizes and build times. Both variants build and run without a GPU; running
# on one needs a GPU host (docs/gpu.md).
#
# Needs a Docker daemon with BuildKit: the one that answers, or else a dockerd of its own (Debian's
# docker.io, installed if missing; needs root), stopped at the end; it stops only what it started.
# When the base image cannot be pulled (no registry reachable), it makes it with
# `debootstrap --variant=minbase` and `docker import`, with empty apt sources.
#
# Environment: HOST_METRICS (default runs/demo/test/eval/metrics.json of this checkout; missing: the
# comparison is reported as not made; HOST_METRICS_WAIT=seconds waits for a host run to finish), METRICS_TOL (0: equal), BASE (debian:bookworm), DEBIAN_MIRROR
# (default: the Debian archive of this machine's apt sources), JOBS (2), LOGDIR (/tmp/redseg-docker),
# SKIP_DEMO=1, DOCKER_CONTEXT (a folder to build instead of HEAD).
# Passed to the build from this machine's configuration, never stored in the image: the Debian
# archive (--build-arg DEBIAN_MIRROR), pip's index-url if one is set (PIP_INDEX_URL), and the CA
# bundle (build secret `ca`).
set -euo pipefail

WHAT=${1:-all}
case "$WHAT" in cpu) VARIANTS=(cpu) ;; cuda) VARIANTS=(cuda) ;; all) VARIANTS=(cpu cuda) ;; *)
  echo "usage: tools/check_docker.sh [cpu|cuda|all]" >&2
  exit 2
  ;;
esac
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGDIR=${LOGDIR:-/tmp/redseg-docker}
HOST_METRICS=${HOST_METRICS:-$REPO/runs/demo/test/eval/metrics.json}
METRICS_TOL=${METRICS_TOL:-0}
BASE=${BASE:-debian:bookworm}
JOBS=${JOBS:-2}
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
mkdir -p "$LOGDIR"
SUMMARY=$LOGDIR/summary.txt
: >"$SUMMARY"

die() {
  echo "check_docker: ERROR: $*" >&2
  exit 1
}
say() { echo "check_docker: $*" | tee -a "$SUMMARY"; }
secs() { awk -v s="$1" 'BEGIN { printf "%d min %02d s", s / 60, s % 60 }'; }

# --- a Docker daemon ------------------------------------------------------------------------------
STARTED_PID=""
cleanup() {
  if [ -n "$STARTED_PID" ]; then
    echo "check_docker: stopping the dockerd it started (pid $STARTED_PID)"
    kill "$STARTED_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$STARTED_PID" 2>/dev/null || break; sleep 1; done
  fi
  if [ -n "${CTX_TMP:-}" ]; then rm -rf "$CTX_TMP"; fi
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || die "no Docker daemon answers, and starting one needs root"
  if ! command -v dockerd >/dev/null; then
    say "installing Debian's docker.io"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; } ||
      die "apt-get install docker.io failed"
  fi
  say "starting a dockerd of its own (log: $LOGDIR/dockerd.log)"
  dockerd --pidfile "$LOGDIR/dockerd.pid" >"$LOGDIR/dockerd.log" 2>&1 &
  STARTED_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || die "dockerd did not start (log: $LOGDIR/dockerd.log)"
fi

# A client that builds with BuildKit (the Dockerfile mounts a build secret and a stage's files): buildx,
# or a classic client (before 23) with DOCKER_BUILDKIT=1, such as Debian 12's docker.io.
if docker buildx version >/dev/null 2>&1; then
  BUILD=(docker buildx build --load)
else
  BUILD=()
  for c in docker /usr/bin/docker; do
    v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$v" ] && [ "${v%%.*}" -lt 23 ]; then
      BUILD=(env DOCKER_BUILDKIT=1 "$c" build)
      break
    fi
  done
  [ ${#BUILD[@]} -gt 0 ] || die "no docker client builds with BuildKit here (install docker-buildx, or Debian's docker.io client)"
fi

# --- the base image ------------------------------------------------------------------------------
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
  grep -oE '[a-z]+://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)}
[ -n "$mirror" ] || die "no Debian archive in this machine's apt sources; set DEBIAN_MIRROR"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if timeout 120 docker pull -q "$BASE" >"$LOGDIR/pull.log" 2>&1; then
    say "pulled $BASE"
  else
    [ "$(id -u)" -eq 0 ] || die "cannot pull $BASE, and debootstrap needs root"
    dist=${BASE#*:}
    root=$LOGDIR/base-$dist
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    say "no registry: making $BASE with debootstrap --variant=minbase $dist"
    rm -rf "$root"
    debootstrap --variant=minbase "$dist" "$root" "$mirror" >"$LOGDIR/debootstrap.log" 2>&1 ||
      die "debootstrap failed (log: $LOGDIR/debootstrap.log)"
    # As Docker's own Debian images: no package lists; and no archive named (the build passes it).
    : >"$root/etc/apt/sources.list"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - "$BASE" >/dev/null
    rm -rf "$root"
  fi
fi

# --- the build context: the committed HEAD ---------------------------------------------------------
if [ -n "${DOCKER_CONTEXT:-}" ]; then
  CTX=$DOCKER_CONTEXT
  say "building from $CTX"
else
  CTX_TMP=$(mktemp -d "$LOGDIR/context.XXXXXX")
  CTX=$CTX_TMP
  git -C "$REPO" archive HEAD | tar -x -C "$CTX"
  say "building from HEAD $(git -C "$REPO" rev-parse --short HEAD)"
fi
build_args=(--network host --progress plain --build-arg "DEBIAN_MIRROR=$mirror" --build-arg "JOBS=$JOBS"
  --build-arg "BASE=$BASE")
[ -z "${DOCKER_CONTEXT:-}" ] && build_args+=(--build-arg "REDSEG_COMMIT=$(git -C "$REPO" rev-parse HEAD)")
index=$(python3 -m pip config get global.index-url 2>/dev/null || true)
[ -n "$index" ] && build_args+=(--build-arg "PIP_INDEX_URL=$index")
[ -s "$CA" ] && build_args+=(--secret "id=ca,src=$CA")

declare -A BUILD_S SIZE
FAILURES=()
for v in "${VARIANTS[@]}"; do
  say "building redseg:$v (log: $LOGDIR/build-$v.log)"
  t0=$(date +%s)
  "${BUILD[@]}" "${build_args[@]}" --build-arg "VARIANT=$v" -t "redseg:$v" "$CTX" >"$LOGDIR/build-$v.log" 2>&1 ||
    die "building redseg:$v failed; the last lines of $LOGDIR/build-$v.log:
$(tail -n 20 "$LOGDIR/build-$v.log")"
  BUILD_S[$v]=$(($(date +%s) - t0))
  SIZE[$v]=$(docker image inspect -f '{{.Size}}' "redseg:$v" | awk '{printf "%.2f GB", $1 / 1e9}')
  say "redseg:$v built in $(secs "${BUILD_S[$v]}") (with what the build cache already held); size ${SIZE[$v]}"
done

# --- checks --------------------------------------------------------------------------------------
USER_ARGS=(--user "$(id -u):$(id -g)")
OTHER_UID=4242:4242 # a uid with no account in the image
# The machine's OpenBLAS kernel overrides go into every container: a host run and a container run
# on one machine are compared, and the kernels decide the rounding (README: "They depend on the BLAS
# kernels"); some machines set OPENBLAS_CORETYPE in their environment, which the host run obeys.
BLAS_ENV=()
for var in OPENBLAS_CORETYPE OPENBLAS_L2_SIZE; do
  [ -n "${!var:-}" ] && BLAS_ENV+=(-e "$var=${!var}")
done
[ ${#BLAS_ENV[@]} -gt 0 ] && say "passed into the containers from this machine: ${BLAS_ENV[*]}"
run() { docker run --rm --network none "${BLAS_ENV[@]}" "$@"; }

check_no_build_tools() { # $1 image: the multi-stage build left compilers, headers and pip behind
  local out
  # shellcheck disable=SC2016 # expanded in the container
  out=$(run "$1" sh -c 'for t in gcc g++ cc nvcc cicc cmake pip pip3; do command -v $t; done; ls /usr/include/boost /usr/include/cuda_runtime.h 2>/dev/null | head -n1' || true)
  [ -z "$out" ] || die "$1 holds build tools or headers: $out"
  say "$1: no compiler, nvcc, cmake, pip or development headers in the image"
}

check_any_uid() { # $1 image: make setup is a quick no-op for a uid the image does not know
  local t0 out
  t0=$(date +%s.%N)
  out=$(run --user "$OTHER_UID" "$1" make setup 2>&1) || die "make setup as uid $OTHER_UID in $1 failed:
$out"
  echo "$out" | grep -q "import caffe OK" || die "make setup as uid $OTHER_UID in $1 did not import Caffe: $out"
  echo "$out" | grep -qiE "apt-get|building Caffe|installing" && die "make setup as uid $OTHER_UID in $1 tried to install or build: $out"
  say "$1: make setup as uid $OTHER_UID: no-op, import caffe OK ($(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s with container start)"
}

check_cpu() {
  local img=redseg:cpu runs=$LOGDIR/runs-cpu t0 tests out ok
  out=$(run "$img")
  echo "$out" | grep -q "^make setup" || die "$img's default command does not print make help: $out"
  say "$img: default command is make help"
  check_no_build_tools "$img"
  check_any_uid "$img"
  rm -rf "$runs" && mkdir -p "$runs"
  t0=$(date +%s)
  if run "${USER_ARGS[@]}" -v "$runs:/work/redseg/runs" "$img" make test >"$LOGDIR/test-cpu.log" 2>&1; then
    ok=passed
  else
    ok=FAILED
    FAILURES+=("make test in $img (log: $LOGDIR/test-cpu.log)")
  fi
  tests=$(grep -E '[0-9]+ passed' "$LOGDIR/test-cpu.log" | tail -n1 | sed 's/=//g; s/^ *//; s/ *$//')
  say "$img: make test $ok: $tests, $(secs $(($(date +%s) - t0)))"
  grep -E '^FAILED ' "$LOGDIR/test-cpu.log" | sed 's/^/  /' | tee -a "$SUMMARY" || true
  [ "${SKIP_DEMO:-0}" = 1 ] && return 0
  t0=$(date +%s)
  run "${USER_ARGS[@]}" -v "$runs:/work/redseg/runs" "$img" make demo >"$LOGDIR/demo-cpu.log" 2>&1 ||
    die "make demo failed in $img; the last lines of $LOGDIR/demo-cpu.log:
$(tail -n 30 "$LOGDIR/demo-cpu.log")"
  local metrics=$runs/demo/test/eval/metrics.json
  [ -f "$metrics" ] || die "make demo wrote no $metrics"
  say "$img: make demo: $(secs $(($(date +%s) - t0))); files owned by $(stat -c %u:%g "$metrics") (the caller is $(id -u):$(id -g))"
  local waited=0
  while [ ! -f "$HOST_METRICS" ] && [ "$waited" -lt "${HOST_METRICS_WAIT:-0}" ]; do
    sleep 30
    waited=$((waited + 30))
  done
  if [ -f "$HOST_METRICS" ]; then
    if ! python3 - "$HOST_METRICS" "$metrics" "$METRICS_TOL" <<'EOF' | tee -a "$SUMMARY"; then
import json, sys

host, box, tol = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), float(sys.argv[3])

def flat(x, pre=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from flat(v, f"{pre}.{k}" if pre else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from flat(v, f"{pre}[{i}]")
    else:
        yield pre, x

a, b = dict(flat(host)), dict(flat(box))
meta = lambda k: k == "meta" or k.startswith("meta.") or k.startswith("meta[")
only = sorted(set(a) ^ set(b))
checked, worst, bad = 0, 0.0, []
for k in sorted(set(a) & set(b)):
    if meta(k):
        continue
    checked += 1
    x, y = a[k], b[k]
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        d = abs(x - y)
        worst = max(worst, d)
        if d > tol:
            bad.append(f"{k}: host {x} container {y}")
    elif x != y:
        bad.append(f"{k}: host {x!r} container {y!r}")
metas = [k for k in sorted(set(a) & set(b)) if meta(k) and a[k] != b[k]]
print(f"check_docker: metrics.json host vs container: {checked} values compared key for key, "
      f"{len(bad)} differ (largest difference {worst:g}, tolerance {tol:g}); keys in one only: {len(only)}; "
      f"meta entries that differ (times, paths): {', '.join(metas) or 'none'}")
for line in (bad + [f"only in one: {k}" for k in only])[:20]:
    print("  " + line)
sys.exit(1 if bad or [k for k in only if not meta(k)] else 0)
EOF
      FAILURES+=("the container's demo metrics.json differs from the host's ($HOST_METRICS)")
    else
      say "$img: metrics.json: the same as the host run's"
    fi
  else
    say "$img: no host metrics at $HOST_METRICS: comparison not made (HOST_METRICS=...)"
  fi
}

check_cuda() {
  local img=redseg:cuda out
  check_no_build_tools "$img"
  check_any_uid "$img"
  out=$(run "${USER_ARGS[@]}" "$img" .venv/bin/python -c '
import subprocess
from redseg.toolchain.caffe_utils import caffe_has_cuda, import_caffe, set_mode
caffe = import_caffe()
print("import caffe OK:", caffe.__file__)
assert caffe_has_cuda(), "not a CUDA build"
libs = subprocess.run(["ldd", "/opt/caffe/build/lib/_caffe.so"], capture_output=True, text=True).stdout
print("CUDA libraries:", " ".join(sorted({l.split()[0] for l in libs.splitlines() if "libcu" in l})))
try:
    set_mode(0)
except RuntimeError as e:
    print("--gpu 0 without a GPU:", e)
else:
    raise SystemExit("set_mode(0) did not stop on a machine without a GPU")
' 2>&1) || die "the CUDA image's checks failed:
$out"
  echo "$out" | sed 's/^/  /' | tee -a "$SUMMARY"
  echo "$out" | grep -q "nvidia-smi not found" || die "asking for a GPU did not give the project's message"
  say "$img: a CUDA build; --gpu 0 without a GPU gives the project's message"
  # The CUDA build in CPU mode: Caffe's own layers, forward and backward (no GPU needed).
  run "${USER_ARGS[@]}" "$img" .venv/bin/python -m pytest -q tests/toolchain/test_caffe_floor.py >"$LOGDIR/test-cuda.log" 2>&1 ||
    die "the floor tests failed in $img (log: $LOGDIR/test-cuda.log)"
  say "$img: CPU mode, tests/toolchain/test_caffe_floor.py: $(grep -E '[0-9]+ passed' "$LOGDIR/test-cuda.log" | tail -n1 | sed 's/=//g; s/^ *//; s/ *$//')"
}

for v in "${VARIANTS[@]}"; do "check_$v"; done

say "images:"
for v in "${VARIANTS[@]}"; do say "  redseg:$v  ${SIZE[$v]}  built in $(secs "${BUILD_S[$v]}")"; done
say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores; summary: $SUMMARY"
if [ ${#FAILURES[@]} -gt 0 ]; then
  for f in "${FAILURES[@]}"; do say "FAILED: $f"; done
  exit 1
fi
say "all checks passed"
