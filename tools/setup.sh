#!/usr/bin/env bash
# `make setup`: the Python environment and a real BVLC Caffe with pycaffe.
#
#   1. .venv with the pinned requirements (requirements.txt);
#   2. BVLC Caffe, from the first source of this chain that works (docs/install.md):
#        CAFFE_ROOT  an existing build (nothing is built);
#        CAFFE_SRC   a BVLC Caffe source folder or tarball you have (1.0 release or a later commit);
#        Debian's source package caffe 1.0.0+git20180821.99bd997-8, through this machine's Debian
#                    archive or DEBIAN_MIRROR (Debian carries it in bullseye only);
#        the upstream repository's tarball at a pinned commit, checked against a pinned digest;
#      patched by the project's own patch set (redseg/toolchain/caffe_source.py) and built with the Python
#      layer into a cache OUTSIDE the repository, keyed by source + patch set + build options +
#      Python version;
#   3. a .pth file so that `import caffe` and the project's own modules work inside .venv.
#
# Idempotent: a finished build carries a `.complete` stamp; a build directory without it is deleted
# and rebuilt, never trusted. A second run takes seconds.
#
# Environment variables (all optional):
#   CAFFE_ROOT      use this already-built Caffe (the folder holding python/caffe) instead of building
#   CAFFE_SRC       build from this BVLC Caffe source folder or tarball (.tar.gz/.tar.bz2/.tar.xz)
#   REDSEG_CACHE    build cache (default: ${XDG_CACHE_HOME:-$HOME/.cache}/redseg)
#   PYTHON          interpreter that creates .venv (default: python3)
#   JOBS            parallel compile jobs (default: nproc)
#   DEBIAN_MIRROR   Debian archive URI to fetch the source from (default: read from apt's sources)
#   LINK_VENV=0     build and check the import, but leave .venv pointing at the Caffe it had
#   SHARED_COL=0    build Caffe without the project's shared im2col buffer patch (docs/install.md):
#                   every convolution layer then owns its buffer, as upstream. Default 1; the two
#                   builds have different cache keys and can both be in the cache
#   SHARED_DIFF=0   build Caffe without the project's shared diff memory patch (docs/install.md): a
#                   net's blob diffs then never share memory, even with REDSEG_SHARED_DIFF=1. Default 1
#   SETUP_SOURCE_ONLY=1  stop once the patched source is in place (prints its folder; no build)
#   CUDA=1          build with CUDA, without cuDNN (docs/gpu.md): CUDA_ROOT (toolkit root; default: the nvcc on
#                   PATH, completed with cuBLAS/cuRAND wheels if it lacks them; with no nvcc on PATH, the
#                   toolkit from NVIDIA's wheels as CUDA_WHEELS=13 would), CUDA_ARCH_BIN ("75 90"),
#                   CUDA_ARCH_PTX (90), CUDA_HOST_COMPILER (the g++ nvcc compiles host code with; default
#                   CMake's compiler; an older toolkit may need an older g++, e.g. /usr/bin/g++-11)
#   CUDA_WHEELS=13  with CUDA=1: assemble the whole toolkit root (nvcc, cudart, cuBLAS, cuRAND, CCCL) from
#                   NVIDIA's PyPI wheels, in the cache, ignoring any nvcc on PATH; a major version takes
#                   the newest release, 13.0 pins one. NVIDIA ships the compiler itself (nvcc, cicc,
#                   cudafe++, fatbinary) as wheels only from CUDA 13 on, whose lowest target is sm_75:
#                   CUDA_WHEELS=12 stops with that message (the -cu12 nvcc wheels hold ptxas only)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CAFFE_DEB_VERSION=1.0.0+git20180821.99bd997-8
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$REPO/.venv}
CACHE=${REDSEG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/redseg}
JOBS=${JOBS:-$(nproc)}
CUDA=${CUDA:-0}
SHARED_COL=${SHARED_COL:-1}
SHARED_DIFF=${SHARED_DIFF:-1}
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

# The project's source helper (standard library only): digests, unpacking, download, patches.
srcpy() { PYTHONPATH="$REPO" "$VENV/bin/python" -m redseg.toolchain.caffe_source "$@"; }

# Each fetch_* puts a Caffe tree at $2 or returns non-zero with the reason in FETCH_ERROR.
fetch_debian() { # $1 = build dir, $2 = where the tree goes
  local dir=$1 dest=$2 uri aptdir
  uri=$(debian_uri | grep -E '/debian/?$' | head -n1 || true)
  if [ -z "$uri" ]; then
    FETCH_ERROR="no Debian archive in /etc/apt/sources* and no DEBIAN_MIRROR"
    return 1
  fi
  command -v apt-get >/dev/null || { FETCH_ERROR="apt-get not found" && return 1; }
  aptdir="$dir/apt"
  mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial"
  # A private apt configuration: a deb-src entry for bullseye (which still ships caffe) with the
  # same archive URI as the system's own entry, without touching /etc/apt.
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri bullseye main" >"$aptdir/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/none"
    -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache" -o "APT::Sandbox::User=root")
  log "fetching Debian source package caffe=$CAFFE_DEB_VERSION from $uri"
  if ! apt-get "${opts[@]}" -qq update >"$aptdir/update.log" 2>&1; then
    FETCH_ERROR="could not read the bullseye source index from $uri ($(grep -m1 -E '^(E|Err):' "$aptdir/update.log" || tail -n1 "$aptdir/update.log"))"
    return 1
  fi
  if ! (cd "$dir" && apt-get "${opts[@]}" -qq source "caffe=$CAFFE_DEB_VERSION" >"$aptdir/source.log" 2>&1); then
    FETCH_ERROR="apt-get source caffe=$CAFFE_DEB_VERSION failed from $uri ($(grep -m1 '^E:' "$aptdir/source.log" || tail -n1 "$aptdir/source.log"))"
    return 1
  fi
  mv "$dir/caffe-${CAFFE_DEB_VERSION%-*}" "$dest" 2>/dev/null || { FETCH_ERROR="unpacked Debian source not found in $dir" && return 1; }
}

fetch_upstream() { # $1 = build dir, $2 = where the tree goes
  log "downloading the pinned upstream BVLC Caffe source${REDSEG_CAFFE_URL:+ from $REDSEG_CAFFE_URL}"
  FETCH_ERROR=$(srcpy download "$2" 2>&1 >/dev/null) || return 1
}

fetch_user_src() { # $1 = build dir, $2 = where the tree goes
  FETCH_ERROR=$(srcpy get "$CAFFE_SRC" "$2" 2>&1) || return 1
  log "$FETCH_ERROR"
}

# A CUDA toolkit root for CMake: the nvcc toolkit itself when it has cuBLAS and cuRAND, otherwise
# one assembled in the cache from that toolkit plus cuBLAS/cuRAND from NVIDIA's PyPI wheels (the
# nvcc shipped on some machines lacks them; docs/gpu.md).
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

# A whole CUDA toolkit root from NVIDIA's PyPI wheels ($1: CUDA major, or major.minor), assembled in
# the cache with hard links: bin/ (nvcc, ptxas, ...), nvvm/ (cicc), include/, lib/ (+ lib64 and
# targets/x86_64-linux links, the layout nvcc.profile and CMake look for).
assemble_wheel_root() {
  local want=$1 major pin suffix root wheels ver d sub
  [[ "$want" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "CUDA_WHEELS=$want: give a CUDA major version (13) or major.minor (13.0)"
  major=${want%%.*}
  pin=""
  [ "$want" != "$major" ] && pin="==$want.*"
  suffix=""
  [ "$major" -lt 13 ] && suffix="-cu$major" # NVIDIA's names up to CUDA 12: nvidia-cuda-nvcc-cu12, ...
  root="$CACHE/cuda-wheels-$want"
  if [ -f "$root/.complete" ]; then
    CUDA_ROOT=$root
    return
  fi
  wheels="$root.wheels"
  rm -rf "$root" "$wheels"
  log "assembling a CUDA $want toolkit root from NVIDIA's PyPI wheels in $root"
  # The compiler's wheel first, alone: it decides whether this CUDA version has a compiler on PyPI.
  "$VENV/bin/python" -m pip install -q --no-deps --target "$wheels" "nvidia-cuda-nvcc$suffix$pin" ||
    die "could not install the wheel nvidia-cuda-nvcc$suffix$pin (see pip's message above)"
  if ! ls "$wheels"/nvidia/*/bin/nvcc >/dev/null 2>&1; then
    local has
    has=$(cd "$wheels" && echo nvidia/*/bin/* nvidia/*/nvvm/*)
    rm -rf "$wheels"
    die "CUDA_WHEELS=$want: NVIDIA's wheel nvidia-cuda-nvcc$suffix holds no nvcc (only: $has).
  NVIDIA ships the whole compiler as wheels from CUDA 13 on (CUDA_WHEELS=13; sm_75 and newer).
  For older GPUs (Pascal sm_61, Volta sm_70) use an installed CUDA 11/12 toolkit: CUDA_ROOT=<its root>
  (e.g. Debian's nvidia-cuda-toolkit, non-free: CUDA_ROOT=/usr CUDA_HOST_COMPILER=/usr/bin/g++-11)"
  fi
  ver=$(cd "$wheels" && ls -d nvidia_cuda_nvcc*.dist-info | sed -n 's/^nvidia_cuda_nvcc[^-]*-\([0-9.]*\)\.dist-info$/\1/p' | head -n1)
  [ -n "$ver" ] || die "no version in the wheel nvidia-cuda-nvcc$suffix"
  rm -rf "$wheels"
  # Then everything in one pip call (a second call into the same --target would replace nvidia/):
  # the compiler and its runtime at that release; cuBLAS, cuRAND and CCCL, which NVIDIA versions
  # apart, the newest for this CUDA major version.
  local below="<$((major + 1))" pkgs
  [ -n "$suffix" ] && below=""
  pkgs=("nvidia-cuda-nvcc$suffix==$ver" "nvidia-cuda-runtime$suffix==${ver%.*}.*" "nvidia-cublas$suffix$below"
    "nvidia-curand$suffix" "nvidia-cuda-cccl$suffix$below")
  [ "$major" -ge 13 ] && pkgs+=("nvidia-cuda-crt==$ver")
  "$VENV/bin/python" -m pip install -q --target "$wheels" "${pkgs[@]}" ||
    die "could not install the CUDA $ver wheels: ${pkgs[*]}"
  mkdir -p "$root/bin" "$root/nvvm" "$root/include" "$root/lib" "$root/targets/x86_64-linux"
  for d in "$wheels"/nvidia/*/; do
    for sub in bin nvvm include lib; do
      if [ -d "$d$sub" ]; then cp -alf "$d$sub/." "$root/$sub/"; fi
    done
  done
  find "$root" -name '__init__.py' -delete
  find "$root" -name '__pycache__' -prune -exec rm -rf {} +
  ln -s lib "$root/lib64"
  ln -s ../../include "$root/targets/x86_64-linux/include"
  ln -s ../../lib "$root/targets/x86_64-linux/lib"
  local f
  for f in cudart cublas cublasLt curand; do # the wheels ship only lib<name>.so.<major>
    [ -e "$root/lib/lib$f.so" ] || ln -s "$(cd "$root/lib" && ls "lib$f.so."* | head -n1)" "$root/lib/lib$f.so"
  done
  ls "$root"/bin/nvcc "$root"/nvvm/bin/cicc "$root"/include/cuda_runtime.h "$root"/include/cublas_v2.h \
    "$root"/lib/libcudart.so "$root"/lib/libcublas.so "$root"/lib/libcurand.so >/dev/null ||
    die "the toolkit root assembled from wheels in $root is incomplete (see above)"
  rm -rf "$wheels" # the hard links keep the files
  printf 'cuda %s\nwheels %s\n' "$ver" "$(date -u +%FT%TZ)" >"$root/.complete"
  CUDA_ROOT=$root
  log "CUDA $ver toolkit root from wheels: $root"
}

caffe_variant() {
  if [ "$CUDA" = 1 ]; then
    echo "cuda$("$CUDA_ROOT/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')-sm${CUDA_ARCH_BIN// /_}"
  else
    echo cpu
  fi
}

# Pick the source (chain above), patch it and build it; sets CAFFE_PY. A build folder is named
#   $CACHE/caffe-<source>-p<patch set>-<variant>-py<X.Y>
build_caffe() {
  local pyver variant patchset suffix label dir src tried=() fetch
  pyver=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$CUDA" = 1 ]; then
    if [ -n "${CUDA_WHEELS:-}" ]; then
      assemble_wheel_root "$CUDA_WHEELS"
    elif [ -z "${CUDA_ROOT:-}" ]; then
      if command -v nvcc >/dev/null; then
        assemble_cuda_root
      else
        log "CUDA=1: no nvcc on PATH; the toolkit from NVIDIA's wheels (CUDA_WHEELS=13)"
        assemble_wheel_root 13
      fi
    fi
    [ -x "$CUDA_ROOT/bin/nvcc" ] || die "no nvcc at $CUDA_ROOT/bin/nvcc"
  fi
  variant=$(caffe_variant)
  case "$SHARED_COL" in 0 | 1) ;; *) die "SHARED_COL=$SHARED_COL: give 1 (share one im2col buffer, the default) or 0 (upstream's)" ;; esac
  case "$SHARED_DIFF" in 0 | 1) ;; *) die "SHARED_DIFF=$SHARED_DIFF: give 1 (blob diffs may share memory, the default) or 0 (upstream's)" ;; esac
  patchset=$(srcpy patchset --shared-col "$SHARED_COL" --shared-diff "$SHARED_DIFF") || die "redseg/toolchain/caffe_source.py does not run under $VENV/bin/python"
  suffix="p$patchset-$variant-py$pyver"
  local upstream_label
  upstream_label="bvlc-$(PYTHONPATH="$REPO" "$VENV/bin/python" -c 'from redseg.toolchain.caffe_source import UPSTREAM_COMMIT as c; print(c[:7])')"
  local candidates=()
  if [ -n "${CAFFE_SRC:-}" ]; then
    label=$(srcpy key "$CAFFE_SRC" 2>&1) || die "${label#setup: ERROR: }"
    candidates=("$label:fetch_user_src")
  else
    candidates=("debian-$CAFFE_DEB_VERSION:fetch_debian" "$upstream_label:fetch_upstream")
    # A finished build from any source of the chain is used as it is.
    for c in "${candidates[@]}"; do
      dir="$CACHE/caffe-${c%%:*}-$suffix"
      if [ -f "$dir/.complete" ] && [ "${SETUP_SOURCE_ONLY:-0}" != 1 ]; then
        CAFFE_PY="$dir/src/python"
        log "Caffe already built: $dir"
        return 0
      fi
    done
  fi
  for c in "${candidates[@]}"; do
    label=${c%%:*}
    fetch=${c#*:}
    dir="$CACHE/caffe-$label-$suffix"
    src="$dir/src"
    CAFFE_PY="$src/python"
    if [ -f "$dir/.complete" ] && [ "${SETUP_SOURCE_ONLY:-0}" != 1 ]; then
      log "Caffe already built: $dir"
      return 0
    fi
    [ -e "$dir" ] && log "removing unfinished build $dir" && rm -rf "$dir"
    mkdir -p "$dir"
    if ! "$fetch" "$dir" "$src"; then
      FETCH_ERROR=${FETCH_ERROR//setup: ERROR: /}
      [ -n "${CAFFE_SRC:-}" ] && rm -rf "$dir" && die "$FETCH_ERROR"
      tried+=("$label: $FETCH_ERROR")
      rm -rf "$dir"
      continue
    fi
    # The tree as fetched, before the patches: provenance, and what the tests re-patch and compare.
    tar -czf "$dir/source.tar.gz" -C "$dir" src || die "could not write $dir/source.tar.gz"
    srcpy patch "$src" --shared-col "$SHARED_COL" --shared-diff "$SHARED_DIFF" || die "patching the Caffe source in $src failed (see above)"
    if [ "${SETUP_SOURCE_ONLY:-0}" = 1 ]; then
      log "source ready: $src"
      exit 0
    fi
    compile_caffe "$dir" "$src" "$label" "$variant" "$pyver"
    return 0
  done
  local msg="no Caffe source could be had. Tried, in order:"
  for t in "${tried[@]}"; do msg+=$'\n'"  - $t"; done
  die "$msg
  Do one of these, then run make setup again:
    make setup CAFFE_SRC=/path/to/caffe   (a BVLC Caffe source folder or tarball, e.g. from
        https://github.com/BVLC/caffe/archive/refs/tags/1.0.tar.gz, fetched on another machine)
    make setup DEBIAN_MIRROR=<a Debian archive URI that still serves bullseye>
    make setup CAFFE_ROOT=/path/to/built/caffe"
}

compile_caffe() { # $1 build dir, $2 source, $3 source label, $4 variant, $5 python version
  local dir=$1 src=$2 buildlog="$1/build.log"
  local cmake_args=(-DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=OFF -DBUILD_python=ON
    -DBUILD_python_layer=ON -Dpython_version=3 -DBLAS=Open -DBUILD_docs=OFF
    "-DPYTHON_EXECUTABLE=$VENV/bin/python" -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_POLICY_VERSION_MINIMUM=3.5) # Caffe asks for CMake 2.8; CMake >= 4 needs this to accept it
  if [ "$CUDA" = 1 ]; then
    cmake_args+=(-DCPU_ONLY=OFF -DUSE_CUDNN=OFF "-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT" -DCUDA_ARCH_NAME=Manual
      "-DCUDA_ARCH_BIN=$CUDA_ARCH_BIN" "-DCUDA_ARCH_PTX=$CUDA_ARCH_PTX")
    if [ -n "${CUDA_HOST_COMPILER:-}" ]; then cmake_args+=("-DCUDA_HOST_COMPILER=$CUDA_HOST_COMPILER"); fi
  else
    cmake_args+=(-DCPU_ONLY=ON)
  fi
  log "building Caffe ($3, $4, $JOBS jobs; a few minutes; log: $buildlog)"
  mkdir -p "$src/build"
  (cd "$src/build" && cmake "${cmake_args[@]}" .. && make -j"$JOBS" pycaffe) >"$buildlog" 2>&1 ||
    die "Caffe build failed; the last lines of $buildlog:
$(tail -n 15 "$buildlog")"
  ls "$src"/python/caffe/_caffe*.so >/dev/null 2>&1 || die "build finished but $src/python/caffe/_caffe.so is missing"
  if [ "$CUDA" = 1 ] && ! grep -q cudaGetDeviceCount "$src"/build/lib/libcaffe.so* 2>/dev/null; then
    # Caffe's CMake quietly falls back to CPU_ONLY when it does not find CUDA: never pass that off.
    die "CUDA=1, but CMake built Caffe without CUDA (toolkit not found under $CUDA_ROOT); see $buildlog"
  fi
  printf 'source %s\npatches %s\nshared_col %s\nshared_diff %s\nvariant %s\npython %s\nbuilt %s\n' "$3" \
    "$(srcpy patchset --shared-col "$SHARED_COL" --shared-diff "$SHARED_DIFF")" "$SHARED_COL" "$SHARED_DIFF" "$4" "$5" \
    "$(date -u +%FT%TZ)" >"$dir/.complete"
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
  # Written only when it changes: a venv that is read-only to this user (a Docker image run with
  # --user) already points at its Caffe.
  if [ "$(cat "$pth" 2>/dev/null)" != "$(printf '%s\n%s\n%s' "$CAFFE_PY" "$REPO" "$REPO/python_layers")" ]; then
    printf '%s\n%s\n%s\n' "$CAFFE_PY" "$REPO" "$REPO/python_layers" >"$pth.tmp" && mv "$pth.tmp" "$pth"
  fi
  GLOG_minloglevel=2 "$VENV/bin/python" -c '
import caffe
assert "Python" in caffe.layer_type_list(), "this Caffe was built without the Python layer"
print("setup: import caffe OK (%s)" % caffe.__file__)' ||
    die "import caffe fails inside $VENV (see the error above)"
  # The OpenBLAS core for this CPU, checked against numpy; applied before every Caffe import (redseg/toolchain/blas.py)
  "$VENV/bin/python" -m redseg.toolchain.blas --setup || log "BLAS check failed: Caffe keeps OpenBLAS's default kernels"
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
