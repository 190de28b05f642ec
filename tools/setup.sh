#!/usr/bin/env bash
# `make setup`: the Python environment and a real BVLC Caffe with pycaffe.
#
#   1. .venv with the pinned requirements (requirements.txt);
#   2. BVLC Caffe 1.0 from Debian's source package caffe 1.0.0+git20180821.99bd997-8 (upstream commit
#      99bd997 plus Debian's OpenCV-4/Python-3/CMake patches), fetched through the Debian archive
#      this machine's apt is already configured with, patched for protobuf >= 3.21 and built with
#      the Python layer into a cache OUTSIDE the repository, keyed by Caffe version + build options +
#      Python version (SPEC section 2);
#   3. a .pth file so that `import caffe` and the project's own modules work inside .venv.
#
# Idempotent: a finished build carries a `.complete` stamp; a build directory without it is deleted
# and rebuilt, never trusted. A second run takes seconds.
#
# Environment variables (all optional):
#   CAFFE_ROOT      use this already-built Caffe (the folder holding python/caffe) instead of building
#   REDSEG_CACHE    build cache (default: ${XDG_CACHE_HOME:-$HOME/.cache}/redseg)
#   PYTHON          interpreter that creates .venv (default: python3)
#   JOBS            parallel compile jobs (default: nproc)
#   DEBIAN_MIRROR   Debian archive URI to fetch the source from (default: read from apt's sources)
#   LINK_VENV=0     build and check the import, but leave .venv pointing at the Caffe it had
#   CUDA=1          build with CUDA, without cuDNN (docs/gpu.md): CUDA_ROOT (toolkit root; default: the nvcc on
#                   PATH, completed with cuBLAS/cuRAND wheels if it lacks them), CUDA_ARCH_BIN ("75 90"),
#                   CUDA_ARCH_PTX (90)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CAFFE_DEB_VERSION=1.0.0+git20180821.99bd997-8
CAFFE_SRC_NAME=caffe-1.0.0+git20180821.99bd997
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$REPO/.venv}
CACHE=${REDSEG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/redseg}
JOBS=${JOBS:-$(nproc)}
CUDA=${CUDA:-0}
CUDA_ARCH_BIN=${CUDA_ARCH_BIN:-75 90}
CUDA_ARCH_PTX=${CUDA_ARCH_PTX:-90}

APT_DEPS=(dpkg-dev cmake g++ make libboost-system-dev libboost-thread-dev libboost-filesystem-dev
  libboost-python-dev libgoogle-glog-dev libgflags-dev libprotobuf-dev protobuf-compiler
  libhdf5-dev libopenblas-dev)

log() { echo "setup: $*"; }
die() {
  echo "setup: ERROR: $*" >&2
  exit 1
}

# --- 1. system build dependencies -------------------------------------------------------------
missing_deps() {
  local p
  for p in "${APT_DEPS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
  done
}

ensure_system_deps() {
  command -v dpkg-query >/dev/null || die "this setup needs a Debian-based system (dpkg-query not found).
  On another system build Caffe yourself and run: make setup CAFFE_ROOT=/path/to/caffe"
  local missing
  missing=$(missing_deps | tr '\n' ' ')
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    die "missing system packages: $missing
  Install them, then run make setup again:
    sudo apt-get update && sudo apt-get install -y $missing"
  fi
  log "installing system packages: $missing"
  apt-get update -qq || die "apt-get update failed; check the machine's apt sources and network"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null ||
    die "apt-get install failed for: $missing"
}

# --- 2. virtual environment -------------------------------------------------------------------
ensure_venv() {
  command -v "$PYTHON" >/dev/null || die "no Python interpreter '$PYTHON' (set PYTHON=...)"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create $VENV (is the python3-venv package installed?)"
  fi
  local stamp
  stamp="$VENV/.requirements-$(sha256sum "$REPO/requirements.txt" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    log "installing pinned requirements into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q -r "$REPO/requirements.txt" ||
      die "pip install -r requirements.txt failed (see pip's message above)"
    rm -f "$VENV"/.requirements-*
    touch "$stamp"
  fi
}

# --- 3. Caffe ---------------------------------------------------------------------------------
debian_uri() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  # The system's own Debian archive entry (deb822 .sources files or one-line sources.list);
  # never a host name written into this project.
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && awk 'tolower($1)=="uris:" {for (i=2;i<=NF;i++) print $i}' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && awk '$1=="deb" || $1=="deb-src" {for (i=2;i<=NF;i++) if ($i ~ /^[a-z+]+:\/\//) {print $i; break}}' "$f"
  done
}

fetch_source() { # $1 = build dir
  local dir=$1 uri aptdir
  uri=$(debian_uri | grep -E '/debian/?$' | head -n1 || true)
  [ -n "$uri" ] || die "no Debian archive found in /etc/apt/sources*; set DEBIAN_MIRROR=<archive URI>"
  aptdir="$dir/apt"
  mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial"
  # A private apt configuration: a deb-src entry for bullseye (which still ships caffe) with the
  # same archive URI as the system's own entry, without touching /etc/apt.
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri bullseye main" >"$aptdir/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/none"
    -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache" -o "APT::Sandbox::User=root")
  log "fetching Debian source package caffe=$CAFFE_DEB_VERSION"
  apt-get "${opts[@]}" -qq update >"$aptdir/update.log" 2>&1 ||
    die "could not read the bullseye source index from $uri (log: $aptdir/update.log).
  Set DEBIAN_MIRROR to a reachable Debian archive, or build Caffe yourself and use CAFFE_ROOT=..."
  (cd "$dir" && apt-get "${opts[@]}" -qq source "caffe=$CAFFE_DEB_VERSION" >"$aptdir/source.log" 2>&1) ||
    die "apt-get source caffe=$CAFFE_DEB_VERSION failed (log: $aptdir/source.log)"
  [ -d "$dir/$CAFFE_SRC_NAME" ] || die "unpacked source not found at $dir/$CAFFE_SRC_NAME"
}

patch_source() { # $1 = source dir; the small changes this toolchain needs (SPEC section 2)
  local src=$1
  # protobuf >= 3.21: SetTotalBytesLimit takes one argument.
  sed -i 's/SetTotalBytesLimit(kProtoReadBytesLimit, 536870912)/SetTotalBytesLimit(kProtoReadBytesLimit)/' \
    "$src/src/caffe/util/io.cpp"
  grep -q 'SetTotalBytesLimit(kProtoReadBytesLimit)' "$src/src/caffe/util/io.cpp" ||
    die "protobuf patch did not apply to $src/src/caffe/util/io.cpp"
  if [ "$CUDA" = 1 ]; then
    # CUDA 13 removed three cudaDeviceProp fields that Caffe::DeviceQuery only prints.
    sed -i -e 's/prop\.clockRate/0/' -e 's/prop\.deviceOverlap/false/' -e 's/prop\.kernelExecTimeoutEnabled/false/' \
      "$src/src/caffe/common.cpp"
  fi
}

# A CUDA toolkit root for CMake: the nvcc toolkit itself when it has cuBLAS and cuRAND, otherwise
# one assembled in the cache from that toolkit plus cuBLAS/cuRAND from NVIDIA's PyPI wheels (the
# nvcc shipped on some machines lacks them; SPEC section 2).
assemble_cuda_root() {
  local nvcc base ver major minor root wheels suffix
  nvcc=$(command -v nvcc) || die "CUDA=1: no nvcc on PATH; set CUDA_ROOT=<toolkit root with bin/nvcc>"
  # The toolkit nvcc belongs to, as nvcc itself reports it (the nvcc on PATH may be a wrapper).
  base=$("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  [ -n "$base" ] || base="$(dirname "$(readlink -f "$nvcc")")/.."
  base=$(cd "$base" && pwd)
  [ -f "$base/include/cuda_runtime.h" ] || [ -n "$(ls "$base"/targets/*/include/cuda_runtime.h 2>/dev/null)" ] ||
    die "no CUDA headers (cuda_runtime.h) in the toolkit of $nvcc ($base); set CUDA_ROOT"
  if ls "$base"/lib64/libcublas.so "$base"/lib64/libcurand.so >/dev/null 2>&1; then
    CUDA_ROOT=$base
    return
  fi
  ver=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
  major=${ver%%.*}
  minor=${ver#*.}
  root="$CACHE/cuda-root-$ver"
  if [ -f "$root/.complete" ]; then
    CUDA_ROOT=$root
    return
  fi
  log "assembling a CUDA $ver toolkit root in $root (nvcc from $base, cuBLAS/cuRAND wheels)"
  rm -rf "$root"
  mkdir -p "$root/include" "$root/lib64"
  wheels="$root/wheels"
  suffix=""
  [ "$major" -lt 13 ] && suffix="-cu$major"
  "$VENV/bin/python" -m pip install -q --target "$wheels" "nvidia-cublas$suffix==$major.$minor.*" "nvidia-curand$suffix" ||
    die "could not install nvidia-cublas$suffix/nvidia-curand$suffix wheels for CUDA $ver"
  local d f
  for d in bin nvvm; do [ -e "$base/$d" ] && ln -s "$base/$d" "$root/$d"; done
  for f in "$base"/include/* "$base"/targets/*/include/*; do [ -e "$f" ] && ln -sf "$f" "$root/include/"; done
  for f in "$base"/lib64/* "$base"/targets/*/lib/*; do [ -e "$f" ] && ln -sf "$f" "$root/lib64/"; done
  for f in "$wheels"/nvidia/*/include/* "$wheels"/nvidia/cu*/include/*; do [ -e "$f" ] && ln -sf "$f" "$root/include/"; done
  for f in "$wheels"/nvidia/*/lib/lib*.so* "$wheels"/nvidia/cu*/lib/lib*.so*; do [ -e "$f" ] && ln -sf "$f" "$root/lib64/"; done
  for f in cublas cublasLt curand; do
    [ -e "$root/lib64/lib$f.so" ] || ln -s "$(ls "$root/lib64/lib$f.so."* | head -n1)" "$root/lib64/lib$f.so"
  done
  ls "$root"/lib64/libcublas.so "$root"/lib64/libcurand.so "$root"/include/cublas_v2.h >/dev/null ||
    die "assembled toolkit root $root lacks cuBLAS/cuRAND"
  touch "$root/.complete"
  CUDA_ROOT=$root
}

build_caffe() {
  local pyver variant key dir src
  pyver=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$CUDA" = 1 ]; then
    [ -n "${CUDA_ROOT:-}" ] || assemble_cuda_root
    [ -x "$CUDA_ROOT/bin/nvcc" ] || die "no nvcc at $CUDA_ROOT/bin/nvcc"
    variant="cuda$("$CUDA_ROOT/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')-sm${CUDA_ARCH_BIN// /_}"
  else
    variant=cpu
  fi
  key="$CAFFE_DEB_VERSION-$variant-py$pyver"
  dir="$CACHE/caffe-$key"
  src="$dir/$CAFFE_SRC_NAME"
  CAFFE_PY="$src/python"
  if [ -f "$dir/.complete" ]; then
    log "Caffe already built: $dir"
    return 0
  fi
  [ -e "$dir" ] && log "removing unfinished build $dir" && rm -rf "$dir"
  mkdir -p "$dir"
  fetch_source "$dir"
  patch_source "$src"
  local buildlog="$dir/build.log"
  local cmake_args=(-DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=OFF -DBUILD_python=ON
    -DBUILD_python_layer=ON -Dpython_version=3 -DBLAS=Open -DBUILD_docs=OFF
    "-DPYTHON_EXECUTABLE=$VENV/bin/python" -DCMAKE_BUILD_TYPE=Release)
  if [ "$CUDA" = 1 ]; then
    cmake_args+=(-DCPU_ONLY=OFF -DUSE_CUDNN=OFF "-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT" -DCUDA_ARCH_NAME=Manual
      "-DCUDA_ARCH_BIN=$CUDA_ARCH_BIN" "-DCUDA_ARCH_PTX=$CUDA_ARCH_PTX")
  else
    cmake_args+=(-DCPU_ONLY=ON)
  fi
  log "building Caffe ($variant, $JOBS jobs; a few minutes; log: $buildlog)"
  mkdir -p "$src/build"
  (cd "$src/build" && cmake "${cmake_args[@]}" .. && make -j"$JOBS" pycaffe) >"$buildlog" 2>&1 ||
    die "Caffe build failed; the last lines of $buildlog:
$(tail -n 15 "$buildlog")"
  ls "$CAFFE_PY"/caffe/_caffe*.so >/dev/null 2>&1 || die "build finished but $CAFFE_PY/caffe/_caffe.so is missing"
  if [ "$CUDA" = 1 ] && ! grep -q cudaGetDeviceCount "$src"/build/lib/libcaffe.so* 2>/dev/null; then
    # Caffe's CMake quietly falls back to CPU_ONLY when it does not find CUDA: never pass that off.
    die "CUDA=1, but CMake built Caffe without CUDA (toolkit not found under $CUDA_ROOT); see $buildlog"
  fi
  printf 'caffe %s\nvariant %s\npython %s\nbuilt %s\n' "$CAFFE_DEB_VERSION" "$variant" "$pyver" "$(date -u +%FT%TZ)" \
    >"$dir/.complete"
  log "Caffe built in $dir"
}

use_caffe_root() {
  CAFFE_PY="$CAFFE_ROOT/python"
  [ -f "$CAFFE_PY/caffe/__init__.py" ] || die "CAFFE_ROOT=$CAFFE_ROOT has no python/caffe/__init__.py"
  ls "$CAFFE_PY"/caffe/_caffe*.so >/dev/null 2>&1 ||
    die "CAFFE_ROOT=$CAFFE_ROOT: pycaffe is not built (no python/caffe/_caffe.so); run 'make pycaffe' there"
  log "using the Caffe in CAFFE_ROOT=$CAFFE_ROOT"
}

# --- 4. wire pycaffe and the project into the venv --------------------------------------------
link_venv() {
  local site pth
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  pth="$site/redseg.pth"
  printf '%s\n%s\n%s\n' "$CAFFE_PY" "$REPO" "$REPO/python_layers" >"$pth.tmp" && mv "$pth.tmp" "$pth"
  GLOG_minloglevel=2 "$VENV/bin/python" -c '
import caffe
assert "Python" in caffe.layer_type_list(), "this Caffe was built without the Python layer"
print("setup: import caffe OK (%s)" % caffe.__file__)' ||
    die "import caffe fails inside $VENV (see the error above)"
}

main() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9 || true # one setup at a time on this machine
  if [ -n "${CAFFE_ROOT:-}" ]; then
    ensure_venv
    use_caffe_root
  else
    ensure_system_deps
    ensure_venv
    build_caffe
  fi
  if [ "${LINK_VENV:-1}" = 1 ]; then
    link_venv
  else # only check that this build imports (make cuda-check), leaving .venv as it is
    PYTHONPATH="$CAFFE_PY" GLOG_minloglevel=2 "$VENV/bin/python" -c 'import caffe; print("setup: import caffe OK:", caffe.__file__)' ||
      die "the build in $CAFFE_PY does not import"
  fi
}

main "$@"
