# Hylas for GPU clusters: CUDA, the CUDA build of PyTorch (with the Triton it pins), Hylas.
#
#   docker build -t hylas .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs hylas hylas train
#   # the documented way in for multi-GPU / multi-node jobs is torchrun:
#   docker run --gpus all --ipc=host --network=host hylas \
#       torchrun --nnodes N --nproc_per_node 8 -m hylas.train --config FILE
#
# Build arguments pick other versions: --build-arg TORCH_SPEC="torch==2.13.0".
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC="torch>=2.5,<3"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/hylas/venv \
    PATH=/opt/hylas/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    HYLAS_CACHE_DIR=/cache/hylas \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions

# A compiler and Python headers: Triton and DeepSpeed build small extensions at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv "$VIRTUAL_ENV" && pip install --no-cache-dir --upgrade pip

# torch first: the default Linux wheel is the CUDA build and brings its matching Triton.
RUN pip install --no-cache-dir "$TORCH_SPEC"

WORKDIR /opt/hylas/src
COPY . .
RUN pip install --no-cache-dir . \
    && python -c "import torch, triton, hylas.train; print('torch', torch.__version__, 'triton', triton.__version__)"

WORKDIR /workspace
CMD ["hylas", "--help"]
