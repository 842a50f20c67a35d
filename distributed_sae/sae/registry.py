"""SAE kinds by name, so configs and saved files can name a kind and get its class."""

from __future__ import annotations

from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.sae.batchtopk import BatchTopKSAE
from distributed_sae.sae.jumprelu import JumpReLUSAE
from distributed_sae.sae.matryoshka import MatryoshkaSAE
from distributed_sae.sae.relu import ReLUSAE
from distributed_sae.sae.topk import TopKSAE

SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    cls.kind: cls for cls in (TopKSAE, ReLUSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)
}


def sae_class(kind: str) -> type[SparseAutoencoder]:
    try:
        return SAE_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown SAE kind {kind!r}: known kinds are {sorted(SAE_CLASSES)}") from None
