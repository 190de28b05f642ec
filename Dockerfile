# Red-Seg in Caffe as a Docker image (docs/gpu.md#the-docker-image). Needs BuildKit (Docker >= 23
# uses it; older: DOCKER_BUILDKIT=1) and nothing but a Debian base image, the Debian archive and PyPI:
#
#   docker build --network host -t redseg:cuda .                     # CUDA, Pascal (sm_61) to Hopper
#   docker build --network host --build-arg VARIANT=cpu -t redseg:cpu .
#   docker run --rm --gpus all --user $(id -u):$(id -g) -v $PWD/runs:/work/redseg/runs \
#              -v /path/to/IDRiD:/data/idrid:ro redseg:cuda make data stage1 ... GPU=0
#
# Build arguments: VARIANT (cuda|cpu), BASE (debian:bookworm), DEBIAN_MIRROR (the Debian archive
# to install from; default the base image's own), PIP_INDEX_URL, JOBS, CUDA_TOOLKIT (debian: CUDA
# 11.8 from Debian's non-free archive, sm_61 to sm_90; wheels: NVIDIA's PyPI wheels, which hold a
# whole compiler only from CUDA 13 on, sm_75 and newer), CUDA_WHEELS, CUDA_ARCH_BIN, CUDA_ARCH_PTX,
# SHARED_COL and SHARED_DIFF (1: the memory patches, the default; 0: without, docs/install.md).
# The machine's CA bundle, if its network needs one, is a build secret:
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt
# Mirror, CA and index are used in the build stages only: the final image copies the built Caffe,
# .venv and the project, and installs its runtime packages from .deb files, offline.
# tools/check_docker.sh builds both variants and checks them.
ARG BASE=debian:bookworm
ARG VARIANT=cuda

FROM ${BASE} AS base
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8

# --- build: compilers, the toolkit, make setup ---------------------------------------------------
FROM base AS build
ARG VARIANT
ARG DEBIAN_MIRROR=
ARG CUDA_TOOLKIT=debian
RUN mkdir -p /work/redseg/tools/docker
WORKDIR /work/redseg
COPY tools/docker/build.sh tools/docker/
RUN --mount=type=secret,id=ca bash tools/docker/build.sh system
# Only what `make setup` reads, so that editing the rest of the project does not rebuild Caffe.
COPY requirements.txt ./
COPY tools/setup.sh tools/
COPY redseg/__init__.py redseg/fileio.py redseg/
COPY redseg/toolchain redseg/toolchain/
ARG PIP_INDEX_URL=
ARG JOBS=
# CUDA_TOOLKIT=wheels only (empty: setup.sh would otherwise take the wheels over CUDA_ROOT); build.sh: 13
ARG CUDA_WHEELS=
ARG CUDA_ARCH_BIN="61 70 75 80 86 90"
ARG CUDA_ARCH_PTX=90
ARG SHARED_COL=1
ARG SHARED_DIFF=1
# The Caffe build and pip's downloads are kept in BuildKit cache mounts, outside the layers: a rebuild
# after a change to the project re-stages the finished build instead of compiling it again.
ENV REDSEG_CACHE=/opt/redseg-cache
RUN --mount=type=secret,id=ca \
    --mount=type=cache,id=redseg-caffe-${VARIANT},target=/opt/redseg-cache \
    --mount=type=cache,id=redseg-pip,target=/root/.cache/pip \
    bash tools/docker/build.sh caffe

# --- debs: the runtime packages' .deb files (installed offline below) ----------------------------
FROM base AS debs
ARG VARIANT
ARG DEBIAN_MIRROR=
ARG CUDA_TOOLKIT=debian
COPY tools/docker/build.sh /tmp/
COPY --from=build /opt/caffe/runtime-packages.txt /tmp/
RUN --mount=type=secret,id=ca bash /tmp/build.sh debs

# --- the image: Caffe, .venv and the project; no compilers, headers, wheels or mirror -------------
FROM base AS runtime
RUN --mount=type=bind,from=debs,source=/debs,target=/debs \
    apt-get install -y -qq --no-install-recommends /debs/*.deb >/dev/null \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY --from=build /opt/caffe /opt/caffe
COPY --from=build /work/redseg/.venv /work/redseg/.venv
WORKDIR /work/redseg
COPY . .
# Any uid (docker run --user): HOME, the cache's lock and the venv's BLAS decision are writable;
# `make setup` (which every target runs first) finds CAFFE_ROOT built and only checks the import.
ENV CAFFE_ROOT=/opt/caffe \
    LD_LIBRARY_PATH=/opt/caffe/build/lib \
    REDSEG_CACHE=/opt/redseg-cache \
    HOME=/home/redseg \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTEST_ADDOPTS="-p no:cacheprovider"
RUN mkdir -p runs data "$HOME" "$REDSEG_CACHE" \
    && make setup \
    && touch "$REDSEG_CACHE/.lock" \
    && chmod 1777 runs data "$HOME" \
    && chmod 0666 "$REDSEG_CACHE/.lock" .venv/redseg-blas.json .venv/lib/python3*/site-packages/redseg_blas.pth \
    && chmod 0777 .venv
VOLUME ["/work/redseg/runs", "/work/redseg/data"]
CMD ["make", "help"]
# The project's commit, for the image has no .git (tools/check_docker.sh passes git rev-parse HEAD).
ARG REDSEG_COMMIT=
ENV REDSEG_COMMIT=${REDSEG_COMMIT}
LABEL org.opencontainers.image.revision=${REDSEG_COMMIT}

FROM runtime AS cpu

FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${VARIANT}
