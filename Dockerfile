# Hylas for GPU clusters: CUDA, the CUDA build of PyTorch (with the Triton it pins), and
# every other package at the exact version of requirements.lock.
#
#   docker build -t hylas .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs hylas hylas train
#   # the documented way in for multi-GPU / multi-node jobs is torchrun:
#   docker run --gpus all --ipc=host --network=host hylas \
#       torchrun --nnodes N --nproc_per_node 8 -m hylas.train --config FILE
#
# The torch of the lock, installed from the default Linux wheels, is a CUDA 13 build: the
# image's CUDA toolkit matches it, for the extensions DeepSpeed and Triton build at run
# time. Build arguments pick others: --build-arg TORCH_SPEC="torch==2.11.0" with a
# matching --build-arg CUDA_IMAGE=...
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/hylas/venv \
    PATH=/opt/hylas/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    HYLAS_CACHE_DIR=/cache/hylas \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions

# A compiler and Python headers: Triton and DeepSpeed build small extensions at run time.
# The distribution's packages follow the base image's release (not pinned one by one).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/hylas/src
COPY requirements.lock ./

# torch first, as scripts/setup.sh does: the lock's version (or TORCH_SPEC) as the CUDA
# build, with the Triton it pins. Then everything else at the lock's versions, without
# resolution (the lock is the whole set), minus the lock's CPU-set-up torch and triton.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip install --no-cache-dir "${TORCH_SPEC:-$(grep -E '^torch==' requirements.lock)}" \
    && grep -vE '^(torch|triton)==' requirements.lock > /tmp/lock-rest.txt \
    && pip install --no-cache-dir --no-deps -r /tmp/lock-rest.txt \
    && rm /tmp/lock-rest.txt

COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check \
    && python -c "import torch, triton, transformers, hylas.train.cli; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

WORKDIR /workspace
CMD ["hylas", "--help"]
