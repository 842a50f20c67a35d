"""SAE kinds (one module each, one interface), the bank of members, and their on-disk form."""

from distributed_sae.sae.bank import MemberSpec, build_sae, expand_bank, member_lr, sae_member
from distributed_sae.sae.base import SAEOutput, SparseAutoencoder
from distributed_sae.sae.batchtopk import BatchTopKSAE
from distributed_sae.sae.gated import GatedSAE
from distributed_sae.sae.jumprelu import JumpReLUSAE
from distributed_sae.sae.matryoshka import MatryoshkaSAE
from distributed_sae.sae.registry import SAE_CLASSES, sae_class
from distributed_sae.sae.relu import ReLUSAE
from distributed_sae.sae.serialization import load_sae, save_sae
from distributed_sae.sae.topk import TopKSAE

SAE = SparseAutoencoder

__all__ = [
    "SAE", "SAE_CLASSES", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "MatryoshkaSAE", "MemberSpec",
    "ReLUSAE", "SAEOutput", "SparseAutoencoder", "TopKSAE", "build_sae", "expand_bank", "member_lr",
    "load_sae", "sae_class", "sae_member", "save_sae",
]
