"""A bank: the list of SAE specs one job trains together from one pass over the store.

`sae.widths=[2304,4608]` expands to one member per width; every batch feeds every member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distributed_sae.config import SAEConfig, TrainConfig
from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.sae.registry import sae_class

K_KINDS = ("topk", "batchtopk", "matryoshka")  # kinds whose sparsity is set by k


@dataclass(frozen=True)
class MemberSpec:
    """One bank member: what to build and how to name it."""

    hook: str
    kind: str
    width: int
    k: int
    seed: int
    # Adam's learning rate; None = train.lr, or the kind's default_lr when that is unset too.
    lr: Optional[float] = None

    @property
    def member_id(self) -> str:
        """Folder name of the member, unique within a bank: e.g. 'topk_w2304_k32_s0'."""
        k = f"_k{self.k}" if self.kind in K_KINDS else ""
        return f"{self.kind}_w{self.width}{k}_s{self.seed}"


def expand_bank(sae: SAEConfig, hook: str) -> list[MemberSpec]:
    """One spec per width; member i gets seed sae.seed + i so members start differently."""
    return [MemberSpec(hook=hook, kind=sae.kind, width=w, k=sae.k, seed=sae.seed + i)
            for i, w in enumerate(sae.widths)]


def member_lr(spec: MemberSpec, train: TrainConfig) -> float:
    """The member's peak learning rate: its spec's, else train.lr, else its kind's default."""
    if spec.lr is not None:
        return spec.lr
    return train.lr if train.lr is not None else sae_class(spec.kind).default_lr


def build_sae(spec: MemberSpec, d_in: int, sae: SAEConfig, train: TrainConfig) -> SparseAutoencoder:
    """Instantiate the member's SAE (fp32 master weights) with the kind's hyperparameters."""
    return sae_class(spec.kind).from_config(d_in, spec.width, sae, train, seed=spec.seed,
                                            dtype=torch.float32)
