"""TopK SAE with the AuxK loss for dead latents (Gao et al. 2024, "Scaling and evaluating SAEs").

Only the k largest pre-activations of a token survive (then ReLU), so L0 <= k by construction and
no sparsity coefficient needs tuning. AuxK: the residual e = x - x_hat is reconstructed from the
top k_aux pre-activations among the dead latents only; training on that pulls dead latents back
towards directions the live ones miss. The paper uses k_aux = d_in / 2 and weight 1/32.

`loss` runs through the kernels' dispatch point (distributed_sae.kernels): the encoder returns
(values, indices) of the top k (and of AuxK's top k_aux), the decoder sums the selected rows of
W_dec, and every gradient is O(batch·k·d): no (batch, d_sae) gradient is ever allocated. On the
2-core build machine (batch 4096, d_in 576, d_sae 4608, k 32) this makes the whole training step
several times faster than the dense one (numbers in docs/kernels.md). DSAE_KERNELS=dense gives
the dense path back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from distributed_sae.kernels import sparse_decode, topk_encode
from distributed_sae.sae.base import SAEOutput, SparseAutoencoder
from distributed_sae.sae.forms import Form
from distributed_sae.sae.latent_ops import LOCAL, LatentOps
from distributed_sae.sae.params import KindParams, from_key, positive


# aux_block's switch: dense AuxK while the dead latents number at most this times k_aux.
# scripts/bench_auxk.py on SmolLM2 layer-15 rows, 2-core Intel Xeon, batch 4096, k 32, k_aux 288,
# whole step sparse / block: 2.12x at 1 x k_aux dead, 1.19x at 4x, 0.68x at 8x (width 2304);
# 1.54x, 1.18x, 0.87x (width 9216). They cross near 5-6x.
AUX_BLOCK_RATIO = 5


class ExtraCodes(NamedTuple):
    """More codes for some rows of a batch, added to their main codes: rows (r,), values and
    indices (r, c2) (BatchTopK's tokens that hold more latents than the batch's candidates)."""

    rows: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor


@dataclass(frozen=True)
class TopKParams(KindParams):
    """TopK: k latents per token; AuxK's weight (Gao et al. use 1/32)."""

    kind = "topk"
    k: int = from_key("sae.k", 32)
    auxk_coefficient: float = from_key("train.auxk_coefficient", 1 / 32)

    def __post_init__(self) -> None:
        positive(self, "k")
        self._require(self.auxk_coefficient >= 0, "auxk_coefficient", "must be >= 0")


class TopKSAE(SparseAutoencoder):
    kind = "topk"
    architecture = "topk"
    Params = TopKParams
    per_latent_codes = False  # a token's k largest over all latents
    # Candidates past k that the training encoder's bf16 screen re-ranks by their exact fp32
    # values (kernels/select.py: screened_topk); 0 = the fp32 GEMM selects. A speed setting the
    # trainer gives (train.topk_screen), not part of the SAE's state.
    screen = 0

    def __init__(self, d_in: int, d_sae: int, k: int, *, auxk_coefficient: float = 1 / 32,
                 seed: int = 0, dtype: torch.dtype = torch.float32,
                 form: Form | None = None) -> None:
        if not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be in 1..d_sae={d_sae}")
        super().__init__(d_in, d_sae, seed=seed, dtype=dtype, form=form)
        self.k = k
        self.auxk_coefficient = auxk_coefficient

    def topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, d_sae) pre-activations -> values (batch, k) after ReLU and indices (batch, k)."""
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        values, indices = self.topk(self.pre_acts(x, ops))
        values = self.chosen(values, ops.k or self.k, ops)
        return torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype,
                           device=x.device).scatter_(1, indices, values)  # (batch, d_sae)

    @staticmethod
    def chosen(values: torch.Tensor, k: int, ops: LatentOps) -> torch.Tensor:
        """Candidate values (rows, c), zero where they are not among their row's k largest over
        all latent shards (on one device every candidate is chosen: values as they are)."""
        sel = ops.select(values.detach(), k)
        if sel is None:
            return values
        # where(), not a product: unchosen slots may hold -inf (fewer dead latents than slots).
        return torch.where(sel[0], values, torch.zeros_like(values))

    def decode_codes(self, values: torch.Tensor, indices: torch.Tensor, ops: LatentOps,
                     bias: bool = True) -> torch.Tensor:
        """The sparse decoder of (batch, c) codes -> (batch, d_in), summed over latent shards."""
        if not ops.sharded:
            return sparse_decode(values, indices, self.W_dec, self.b_dec if bias else None)
        out = ops.sum(sparse_decode(values, indices, self.W_dec))  # (batch, d_in)
        return out + self.b_dec if bias else out

    def k_aux(self, dead: torch.Tensor | None, ops: LatentOps = LOCAL) -> int:
        """AuxK's k: d_in / 2, at most the number of dead latents (over every shard); 0 without
        dead latents."""
        if dead is None:
            return 0
        return min(self.d_in // 2, ops.count(dead.sum()))

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0, ops: LatentOps = LOCAL,
             target: torch.Tensor | None = None) -> SAEOutput:
        """MSE + AuxK. `sparsity_scale` is unused: TopK fixes L0 by construction, no penalty."""
        k_aux = self.k_aux(dead, ops)
        # This shard's k (and k_aux) largest are the candidates of the member's k over shards.
        code = self.sparse_encode(x, self.k, dead, k_aux, ops)
        values = self.chosen(code.values, ops.k or self.k, ops)  # (batch, k)
        return self.codes_loss(x, target, values, code, k_aux, ops, dead=dead)

    def sparse_encode(self, x: torch.Tensor, k: int, dead: torch.Tensor | None,
                      k_aux: int, ops: LatentOps = LOCAL) -> Any:
        """The kernels' encoder: each row's k largest (values after ReLU, indices: (batch, k)),
        and with k_aux > 0 the k_aux largest among `dead` latents."""
        if self.aux_block(dead, k_aux, ops):
            k_aux = 0  # codes_loss computes AuxK over the dead latents' columns instead
        return topk_encode(x, self.W_enc, self.b_enc, self.enc_bias(ops), k,
                           dead=dead if k_aux > 0 else None, k_aux=min(k_aux, self.d_sae),
                           screen=self.screen)

    @staticmethod
    def aux_block(dead: torch.Tensor | None, k_aux: int, ops: LatentOps = LOCAL) -> bool:
        """Whether AuxK runs as dense GEMMs over the dead latents' columns rather than as
        sparse (batch, k_aux) codes: when the dead are at most AUX_BLOCK_RATIO x k_aux.

        AuxK's k_aux is d_in / 2 = 288 at d_in 576, 9-18x the main k, so its sparse decode and
        backward cost far more than the main path's while few latents are dead; five GEMMs over
        the n_dead columns (batch x d x n_dead each) are cheaper up to the ratio measured by
        scripts/bench_auxk.py. Latent shards keep the sparse path: their selection all-gathers
        (batch, k_aux) candidates of equal width from every shard."""
        if dead is None or k_aux <= 0 or ops.sharded:
            return False
        return int(dead.sum()) <= AUX_BLOCK_RATIO * k_aux

    def codes_loss(self, x: torch.Tensor, target: torch.Tensor | None, values: torch.Tensor,
                   code: Any, k_aux: int, ops: LatentOps = LOCAL,
                   extra: ExtraCodes | None = None, dead: torch.Tensor | None = None
                   ) -> SAEOutput:
        """MSE (+ AuxK) of sparse codes: values (batch, c), zero where not chosen, at
        code.indices (plus `extra` codes of some rows), with AuxK's candidates in code.aux_*
        (or, under aux_block, computed here from `dead`); the decode is sparse."""
        y = self.target_of(x, target)  # (batch, d_out)
        x_hat, loss, terms = self.codes_reconstruction(x, y, values, code.indices, ops, extra)
        if code.aux_values is not None and code.aux_indices is not None:
            aux = self.chosen(code.aux_values, k_aux, ops)  # (batch, k_aux)
            e_hat = self.decode_codes(aux, code.aux_indices, ops, bias=False)  # (batch, d_in)
            terms["auxk"] = self._auxk_term(y - x_hat.detach(), e_hat)
        elif dead is not None and k_aux > 0:  # sparse_encode left AuxK to aux_block
            terms["auxk"] = self._auxk_term(y - x_hat.detach(), self.aux_block_decode(
                x, dead, k_aux, ops))
        if "auxk" in terms:
            loss = loss + self.auxk_coefficient * terms["auxk"]
        counts = self.fire_counts(values, code.indices)
        if extra is not None:
            counts += self.fire_counts(extra.values, extra.indices)
        return SAEOutput(loss=loss, x_hat=x_hat, terms=terms, fired=counts > 0, counts=counts)

    def codes_reconstruction(self, x: torch.Tensor, y: torch.Tensor, values: torch.Tensor,
                             indices: torch.Tensor, ops: LatentOps = LOCAL,
                             extra: ExtraCodes | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x_hat (batch, d_out), loss, terms) of sparse codes (batch, c) (and `extra`)
        reconstructing y; Matryoshka overrides it with its prefixes."""
        x_hat = self.with_skip(self.decode_rows(values, indices, ops, extra), x)  # (batch, d_out)
        mse = F.mse_loss(x_hat, y)
        return x_hat, mse, {"mse": mse}

    def decode_rows(self, values: torch.Tensor, indices: torch.Tensor, ops: LatentOps,
                    extra: ExtraCodes | None) -> torch.Tensor:
        """decode_codes of (batch, c) codes with `extra`'s codes added to its rows."""
        out = self.decode_codes(values, indices, ops)  # (batch, d_out)
        if extra is None:
            return out
        more = self.decode_codes(extra.values, extra.indices, ops, bias=False)  # (r, d_out)
        return out.index_add(0, extra.rows, more)

    def fire_counts(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(d_sae,) int32: tokens on which each latent has a positive value in (batch, k) codes.
        A count by index_add_ (deterministic integer adds) avoids boolean-mask indexing's
        nonzero pass."""
        counts = torch.zeros(self.d_sae, dtype=torch.int32, device=values.device)
        counts.index_add_(0, indices.reshape(-1), (values.reshape(-1) > 0).to(torch.int32))
        return counts

    def _auxk(self, residual: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor,
              ops: LatentOps = LOCAL) -> torch.Tensor:
        """Normalised error of reconstructing the residual (batch, d_in) from dead latents, from
        dense pre-activations (batch, d_sae) (the BatchTopK kinds); the decode is sparse."""
        k_aux = self.k_aux(dead, ops)
        masked = pre.masked_fill(~dead, float("-inf"))  # (batch, d_sae)
        values, indices = masked.topk(min(k_aux, self.d_sae), dim=-1, sorted=False)
        values = self.chosen(values.relu(), k_aux, ops)
        e_hat = self.decode_codes(values, indices, ops, bias=False)  # (batch, d_in)
        return self._auxk_term(residual, e_hat)

    def aux_block_decode(self, x: torch.Tensor, dead: torch.Tensor, k_aux: int,
                         ops: LatentOps = LOCAL) -> torch.Tensor:
        """AuxK's reconstruction (batch, d_out) from each row's k_aux largest pre-activations
        among the dead latents, by dense GEMMs over their columns (the same selection as
        topk_encode's aux codes; plain autograd, so the gradients are GEMMs too)."""
        idx = dead.nonzero().squeeze(1)  # (n_dead,)
        w = self.W_enc[:, idx]  # (d_in, n_dead)
        # (x - b) W + c as x W + (c - b W): b's gradient is then a vector product, not a fifth
        # GEMM (x needs none).
        pre = torch.addmm(self.b_enc[idx] - self.enc_bias(ops) @ w, x, w)  # (batch, n_dead)
        if k_aux < idx.numel():
            top, where = pre.topk(k_aux, dim=-1, sorted=False)  # (batch, k_aux)
            codes = torch.zeros_like(pre).scatter(1, where, top.relu())
        else:
            codes = pre.relu()  # k_aux = n_dead: every dead latent
        return codes @ self.W_dec[idx]  # (batch, d_out)

    @staticmethod
    def _auxk_term(residual: torch.Tensor, e_hat: torch.Tensor) -> torch.Tensor:
        # Normalised by the residual's variance so the term is ~1 at start whatever the scale.
        denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return (e_hat - residual).pow(2).sum() / denom

    def saelens_cfg(self) -> dict[str, Any]:
        return {"architecture": "topk", "k": self.k, "rescale_acts_by_decoder_norm": False}

    def extra_state(self) -> dict[str, Any]:
        return {"k": self.k, "auxk_coefficient": self.auxk_coefficient}
