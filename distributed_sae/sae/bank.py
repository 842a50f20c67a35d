"""A bank: the list of SAE specs one job trains together from one pass over the store.

`sae.widths=[2304,4608]` expands to one member per width; every batch feeds every member.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distributed_sae.config import SAEConfig, TrainConfig
from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.sae.registry import sae_class


@dataclass(frozen=True)
class MemberSpec:
    """One bank member: what to build and how to name it."""

    hook: str
    kind: str
    width: int
    k: int
    seed: int

    @property
    def member_id(self) -> str:
        """Folder name of the member, unique within a bank: e.g. 'topk_w2304_k32_s0'."""
        return f"{self.kind}_w{self.width}_k{self.k}_s{self.seed}"


def expand_bank(sae: SAEConfig, hook: str) -> list[MemberSpec]:
    """One spec per width; member i gets seed sae.seed + i so members start differently."""
    return [MemberSpec(hook=hook, kind=sae.kind, width=w, k=sae.k, seed=sae.seed + i)
            for i, w in enumerate(sae.widths)]


def build_sae(spec: MemberSpec, d_in: int, train: TrainConfig) -> SparseAutoencoder:
    """Instantiate the member's SAE (fp32 master weights)."""
    cls = sae_class(spec.kind)
    return cls(d_in, spec.width, k=spec.k, auxk_coefficient=train.auxk_coefficient,
               seed=spec.seed, dtype=torch.float32)
