#!/usr/bin/env bash
# The Dockerfile's build steps (tools/docker/build.sh STEP), run inside the image's build stages only:
# nothing these steps configure (the package mirror, the CA bundle, the compilers, the toolkit's
# headers, the wheels) reaches the final image, which copies only /opt/caffe, .venv and the project.
#
#   system   apt sources from DEBIAN_MIRROR (or the base image's own), the prerequisites README
#            names, and for VARIANT=cuda with CUDA_TOOLKIT=debian Debian's nvidia-cuda-toolkit
#   caffe    `make setup` (tools/setup.sh; CPU, or CUDA=1 with the chosen toolkit), then the built Caffe staged in
#            /opt/caffe (python/ and build/lib/, the layout CAFFE_ROOT expects) and .venv pointed at
#            it; /opt/caffe/runtime-packages.txt lists the Debian packages whose libraries it loads
#   debs     the .deb files of those packages, for the final stage to install without a network
#
# Build arguments arrive as environment variables: VARIANT (cpu|cuda), DEBIAN_MIRROR, CUDA_TOOLKIT
# (debian|wheels), CUDA_WHEELS, CUDA_ARCH_BIN, CUDA_ARCH_PTX, SHARED_COL, SHARED_DIFF, JOBS,
# PIP_INDEX_URL. The machine's CA bundle, when given, is the build secret `ca` (/run/secrets/ca).
set -euo pipefail

STEP=${1:?usage: tools/docker/build.sh system|caffe|debs}
VARIANT=${VARIANT:-cuda}
CUDA_TOOLKIT=${CUDA_TOOLKIT:-debian}
STAGE=/opt/caffe
export DEBIAN_FRONTEND=noninteractive

log() { echo "docker-build: $*"; }
die() {
  echo "docker-build: ERROR: $*" >&2
  exit 1
}

# The machine's CA bundle (a TLS-inspecting proxy's CA, say), for pip, Python and apt over HTTPS.
if [ -s /run/secrets/ca ]; then
  export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca REQUESTS_CA_BUNDLE=/run/secrets/ca
  echo 'Acquire::https::CAInfo "/run/secrets/ca";' >/etc/apt/apt.conf.d/99redseg-ca
else
  rm -f /etc/apt/apt.conf.d/99redseg-ca
fi

apt_sources() {
  local mirror=${DEBIAN_MIRROR:-} codename components=main
  # shellcheck source=/dev/null
  . /etc/os-release
  codename=$VERSION_CODENAME
  if [ -z "$mirror" ]; then # the base image's own archive entry (deb822 or one-line)
    mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
      grep -oE '[a-z+]+://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  fi
  [ -n "$mirror" ] || die "the base image names no Debian archive: pass --build-arg DEBIAN_MIRROR=<archive URI>"
  # Debian's CUDA toolkit lives in non-free.
  [ "$VARIANT" = cuda ] && [ "$CUDA_TOOLKIT" = debian ] && components="main contrib non-free"
  rm -f /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list
  echo "deb $mirror $codename $components" >/etc/apt/sources.list
  log "apt: $codename $components from the build's Debian archive"
}

apt_install() {
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

step_system() {
  apt_sources
  # README's prerequisites; setup.sh installs Caffe's build packages itself (it runs as root here).
  local pkgs=(make python3 python3-venv ca-certificates)
  if [ "$VARIANT" = cuda ] && [ "$CUDA_TOOLKIT" = debian ]; then
    # CUDA 11.8 (bookworm): sm_35 to sm_90, so Pascal (the paper's 1080Ti) to Hopper; its nvcc
    # wants a g++ no newer than 11.
    pkgs+=(nvidia-cuda-toolkit g++-11)
  fi
  log "installing ${pkgs[*]}"
  apt_install "${pkgs[@]}"
  rm -rf /var/lib/apt/lists/*
}

step_caffe() {
  local args=("SHARED_COL=${SHARED_COL:-1}" "SHARED_DIFF=${SHARED_DIFF:-1}")
  if [ "$VARIANT" = cuda ]; then
    args+=(CUDA=1 "CUDA_ARCH_BIN=${CUDA_ARCH_BIN:-61 70 75 80 86 90}" "CUDA_ARCH_PTX=${CUDA_ARCH_PTX:-90}")
    case "$CUDA_TOOLKIT" in
      debian) args+=(CUDA_ROOT=/usr CUDA_HOST_COMPILER=/usr/bin/g++-11) ;;
      wheels) args+=("CUDA_WHEELS=${CUDA_WHEELS:-13}") ;;
      *) die "CUDA_TOOLKIT=$CUDA_TOOLKIT: debian or wheels" ;;
    esac
  fi
  apt-get update -qq # setup.sh installs Caffe's build packages from these sources
  # What `make setup ARGS` runs (the Makefile is left out of this stage so that editing it does not
  # rebuild Caffe).
  env "${args[@]}" bash tools/setup.sh
  rm -rf /var/lib/apt/lists/*
  stage_caffe
}

# The built Caffe without its objects and sources: python/ (pycaffe) and build/lib/ (libcaffe,
# _caffe.so), which is what CAFFE_ROOT and redseg.toolchain.caffe_utils.caffe_has_cuda expect.
stage_caffe() {
  local src so lib pkgs real owner
  src=$(GLOG_minloglevel=2 .venv/bin/python -c 'import caffe, os; print(os.path.dirname(os.path.dirname(os.path.dirname(caffe.__file__))))')
  log "staging the Caffe of $src in $STAGE"
  rm -rf "$STAGE"
  mkdir -p "$STAGE/build"
  cp -a "$src/python" "$STAGE/python"
  cp -a "$src/build/lib" "$STAGE/build/lib"
  rm -f "$STAGE"/build/lib/*.a
  ln -sfn ../../build/lib/_caffe.so "$STAGE/python/caffe/_caffe.so"
  # Every shared library Caffe and the venv's extensions load: a Debian package's goes into the
  # runtime package list; any other (a CUDA library from the wheels) is copied beside libcaffe.
  : >/tmp/libs
  for so in "$STAGE"/build/lib/*.so* $(find .venv -name '*.so*' -type f) "$(readlink -f .venv/bin/python)"; do
    LD_LIBRARY_PATH=$STAGE/build/lib ldd "$so" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}' >>/tmp/libs
  done
  pkgs=$(sort -u /tmp/libs | while read -r lib; do
    case "$lib" in "$STAGE"/* | "$PWD"/.venv/*) continue ;; esac
    real=$(readlink -f "$lib")
    owner=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$real" 2>/dev/null || dpkg -S "${real#/usr}" 2>/dev/null || true)
    if [ -n "$owner" ]; then
      echo "${owner%%:*}"
    else
      cp -L "$lib" "$STAGE/build/lib/" && log "copied $lib (no Debian package)" >&2
    fi
  done | sort -u)
  printf '%s\n' "$pkgs" make python3 | sort -u >"$STAGE/runtime-packages.txt"
  log "runtime packages: $(tr '\n' ' ' <"$STAGE/runtime-packages.txt")"
  # .venv from now on uses the staged copy (the path the final image has).
  LD_LIBRARY_PATH=$STAGE/build/lib CAFFE_ROOT=$STAGE bash tools/setup.sh
}

step_debs() {
  apt_sources
  apt-get update -qq
  # shellcheck disable=SC2046
  apt-get install -y -qq --no-install-recommends --download-only $(cat /tmp/runtime-packages.txt) >/dev/null
  mkdir -p /debs
  mv /var/cache/apt/archives/*.deb /debs/ 2>/dev/null || true
  log "$(find /debs -name '*.deb' | wc -l) runtime .deb files"
}

"step_$STEP"
