"""distributed-sae: train banks of sparse autoencoders on transformer activations.

The package reads as the data path:
    models -> data -> harvest -> store -> sae -> train -> eval -> export
with `parallel` owning Ray clusters, placement and world size, and `config` the typed configs.
Heavy imports (torch, Ray, transformers) happen in the subpackages, on first use.
"""

__version__ = "0.1.0"

__all__ = ["SAE", "__version__"]


def __getattr__(name: str) -> type:
    """`distributed_sae.SAE` (= sae.SparseAutoencoder, with SAE.load) imported on first use, so
    `import distributed_sae` stays free of torch."""
    if name in ("SAE", "SparseAutoencoder"):
        from distributed_sae.sae import SparseAutoencoder

        return SparseAutoencoder
    raise AttributeError(f"module 'distributed_sae' has no attribute {name!r}")
