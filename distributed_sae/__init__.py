"""distributed-sae: train banks of sparse autoencoders on transformer activations.

The package reads as the data path:
    models -> data -> harvest -> store -> sae -> train -> eval -> export
with `parallel` owning Ray clusters, placement and world size, and `config` the typed configs.
Heavy imports (torch, Ray, transformers) happen in the subpackages, on first use.
"""

__version__ = "0.1.0"
