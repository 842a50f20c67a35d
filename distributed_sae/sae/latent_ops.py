"""The few operations a kind's math needs when its latents may be split over shards.

A kind writes its loss once, calling these where a sum or a selection runs over latents:
    ops.replicated(b_dec)    b_dec used by a per-latent computation (the encoder): on shards its
                             gradient is summed over them
    ops.sum(t)               a sum over latents computed per shard (x_hat's partial products,
                             an L1 or L0 term): summed over shards, gradient passed through
    ops.count(n)             a count over latents (dead latents): summed over shards
    ops.select(values, k)    which of this shard's candidate values (rows, c) are among the k
                             largest of their row over all shards (None: all of them)
    ops.k                    the member's k when its latents are split (a shard's own k is
                             clipped to its width); None on one device
On one device (LOCAL, this class) every operation is the identity and `select` returns None, so
a kind's single-device numbers are exactly what they were. parallel/latent_shard.py gives a
latent-sharded member a ShardOps doing the collectives: SAE code never imports
torch's distributed package, and parallel/ never names a kind.
"""

from __future__ import annotations

import torch


class LatentOps:
    """The single-device operations: identities."""

    sharded = False
    k: int | None = None

    def replicated(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def count(self, n: torch.Tensor) -> int:
        return int(n)

    def select(self, values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mask (rows, c) of the candidates among the k largest of their row over all shards,
        those k values (rows, k)), or None on one device (every candidate is chosen)."""
        return None


LOCAL = LatentOps()
