"""SAE kinds by name, so configs and saved files can name a kind and get its class.

Adding a kind: one module in sae/ whose class sets `kind`, `architecture`, `Params` (and
`shardable`), listed in KIND_CLASSES below. Every list of kinds elsewhere (the config's choices,
the k-kinds, the shardable kinds) is derived from this registry.
"""

from __future__ import annotations

from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.sae.batchtopk import BatchTopKSAE
from distributed_sae.sae.gated import GatedSAE
from distributed_sae.sae.jumprelu import JumpReLUSAE
from distributed_sae.sae.matryoshka import MatryoshkaSAE
from distributed_sae.sae.relu import ReLUSAE
from distributed_sae.sae.topk import TopKSAE

KIND_CLASSES: tuple[type[SparseAutoencoder], ...] = (
    TopKSAE, ReLUSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, GatedSAE,
)
SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {cls.kind: cls for cls in KIND_CLASSES}


def sae_class(kind: str) -> type[SparseAutoencoder]:
    try:
        return SAE_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown SAE kind {kind!r}: known kinds are {sorted(SAE_CLASSES)}") from None


def kinds() -> tuple[str, ...]:
    """Every registered kind's name."""
    return tuple(SAE_CLASSES)


def k_kinds() -> tuple[str, ...]:
    """Kinds whose sparsity is set by k (their Params have a k)."""
    return tuple(name for name, cls in SAE_CLASSES.items() if cls.Params.has("k"))


def shardable_kinds() -> tuple[str, ...]:
    """Kinds that parallel/latent_shard.py can split by latents."""
    return tuple(name for name, cls in SAE_CLASSES.items() if cls.shardable)


def latent_axes() -> dict[str, int]:
    """Every kind's per-latent tensors by state-dict name -> latent axis."""
    return {name: axis for cls in KIND_CLASSES for name, axis in cls.latent_axes.items()}


def replicated_tensors() -> set[str]:
    """Every kind's state-dict names that are replicated over latent shards."""
    return {name for cls in KIND_CLASSES for name in cls.replicated}
