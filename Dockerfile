# Red-Seg in Caffe, CUDA build, for a GPU host:  docker build -t redseg .
#   docker run --gpus all -v /path/to/IDRiD:/data/idrid:ro -v $PWD/runs:/work/redseg/runs \
#              -v $PWD/models:/work/redseg/models redseg make data stage1 stage2 evaluate \
#              IDRID=/data/idrid GPU=0 VGG16=models/VGG_ILSVRC_16_layers.caffemodel
# (see README "GPU and Docker"). Caffe is built by the same `make setup` as everywhere else.
#
# CUDA 12.x still targets Pascal (sm_61, the paper's GTX 1080Ti); CUDA 13 does not. The toolkit comes
# from NVIDIA's CUDA image; the system is Debian bookworm, whose apt sources `make setup` reads to
# fetch Debian's Caffe source package.
ARG CUDA_VERSION=12.4
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04
FROM ${CUDA_IMAGE} AS cuda

FROM debian:bookworm
ARG CUDA_VERSION
# The versioned folder: /usr/local/cuda itself is a symlink in NVIDIA's images.
COPY --from=cuda /usr/local/cuda-${CUDA_VERSION} /usr/local/cuda
ENV PATH=/usr/local/cuda/bin:${PATH} \
    LD_LIBRARY_PATH=/usr/local/cuda/lib64 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev make g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /work/redseg
COPY . .
# Pascal (1080Ti) to Hopper; cuDNN off (Caffe 1.0's cuDNN code predates the cuDNN 8 API, docs/gpu.md).
ARG CUDA_ARCH_BIN="61 70 75 80 86 90"
ENV REDSEG_CACHE=/opt/redseg-cache
RUN make setup CUDA=1 CUDA_ROOT=/usr/local/cuda CUDA_ARCH_BIN="${CUDA_ARCH_BIN}" CUDA_ARCH_PTX=90 \
    && rm -rf /root/.cache/pip
VOLUME ["/work/redseg/runs", "/work/redseg/data"]
CMD ["make", "help"]
