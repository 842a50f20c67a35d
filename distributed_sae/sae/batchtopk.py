"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k x batch largest ReLU'd pre-activations of the whole batch rather than k per
token: the batch's mean L0 is exactly k (when that many are positive) while a token may use more
or fewer latents than k, spending capacity where the input is complex.

That selection depends on the rest of the batch, so inference needs a per-token rule. During
training a threshold θ tracks the smallest selected activation (the paper averages it over
batches; an exponential moving average here, so it follows the drift while weights change), and
in eval mode
    f = ReLU(pre) * (pre > θ)
which is SAELens's 'jumprelu' with θ broadcast to every latent. Dead latents get AuxK as in TopK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distributed_sae.sae.base import SAEOutput
from distributed_sae.sae.forms import Form
from distributed_sae.sae.latent_ops import LOCAL, LatentOps
from distributed_sae.sae.topk import ExtraCodes, TopKParams, TopKSAE


@dataclass(frozen=True)
class BatchTopKParams(TopKParams):
    """BatchTopK: k active latents per token on average over the batch; the inference
    threshold's EMA momentum."""

    kind = "batchtopk"
    threshold_momentum: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(0.0 <= self.threshold_momentum < 1.0, "threshold_momentum",
                      "must be in [0, 1)")

# (x_hat (batch, d_out), scalar reconstruction loss, scalar terms by name)
Reconstruction = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class BatchTopKSAE(TopKSAE):
    kind = "batchtopk"
    architecture = "jumprelu"
    Params = BatchTopKParams
    per_latent_codes = True  # at inference, one threshold per latent
    # Training selects among each token's candidate_factor x k largest pre-activations
    # (sparse_select), not over the whole (batch, d_sae) block. On the 2-core build machine,
    # quiet, a SmolLM2 layer-15 batch of 4096, d_sae 4608 (scripts/bench_batchtopk.py): the
    # step took 276 ms against 1230 ms dense at k=16 (1.79x the encoder GEMM) and 326 against
    # 1278 at k=32; the dense flat top-(k x batch) alone costs more than the GEMM.
    candidate_factor = 4
    # False: the dense selection (scripts/bench_batchtopk.py's baseline).
    sparse_training = True

    def __init__(self, d_in: int, d_sae: int, k: int, *, auxk_coefficient: float = 1 / 32,
                 threshold_momentum: float = 0.99, seed: int = 0,
                 dtype: torch.dtype = torch.float32, form: Form | None = None) -> None:
        super().__init__(d_in, d_sae, k, auxk_coefficient=auxk_coefficient, seed=seed, dtype=dtype,
                         form=form)
        if not 0.0 <= threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum={threshold_momentum} must be in [0, 1)")
        self.threshold_momentum = threshold_momentum
        # Inference threshold on pre-activations; 0 (plain ReLU) until the first training batch.
        self.register_buffer("threshold", torch.zeros((), dtype=dtype))
        self.threshold_updates = 0

    def batch_topk(self, pre: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        """(batch, d_sae) pre-activations -> (batch, d_sae) activations keeping the k x batch
        largest ReLU'd values of the whole batch (over every latent shard)."""
        return self.batch_select(pre, ops)[0]

    def batch_select(self, pre: torch.Tensor, ops: LatentOps = LOCAL
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch_topk's activations, the selected values over every shard, for θ)."""
        flat = pre.relu().flatten()  # (batch * d_sae,)
        n_keep = (ops.k or self.k) * pre.shape[0]
        values, indices = flat.topk(min(n_keep, flat.numel()), sorted=False)
        sel = ops.select(values.detach()[None], n_keep)
        selected = values
        if sel is not None:
            values = torch.where(sel[0][0], values, torch.zeros_like(values))
            selected = sel[1][0]  # the k x batch values over every shard, the same on each
        return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre), selected

    def threshold_encode(self, pre: torch.Tensor) -> torch.Tensor:
        """Per-token inference rule: (batch, d_sae) -> ReLU(pre) * (pre > θ)."""
        return pre.relu() * (pre > self.threshold)

    def activate(self, pre: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        """Batch selection in training mode, the threshold in eval mode."""
        return self.batch_topk(pre, ops) if self.training else self.threshold_encode(pre)

    def encode(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        return self.activate(self.pre_acts(x, ops), ops)  # (batch, d_sae)

    @torch.no_grad()
    def update_threshold(self, f: torch.Tensor) -> None:
        """Fold this batch's smallest selected activation (f: the activations, or the selected
        values) into θ's EMA."""
        selected = f[f > 0]
        if selected.numel() == 0:
            return
        smallest = selected.min().to(self.threshold.dtype)
        if self.threshold_updates == 0:
            self.threshold.copy_(smallest)
        else:  # θ <- m θ + (1 - m) min
            self.threshold.lerp_(smallest, 1.0 - self.threshold_momentum)
        self.threshold_updates += 1

    def reconstruction_loss(self, x: torch.Tensor, y: torch.Tensor, f: torch.Tensor,
                            ops: LatentOps = LOCAL) -> Reconstruction:
        """(x_hat (batch, d_out), loss, terms) of activations f reconstructing the target y
        from input x; Matryoshka overrides this."""
        x_hat = self.with_skip(self.decode(f, ops), x)  # (batch, d_out)
        mse = F.mse_loss(x_hat, y)
        return x_hat, mse, {"mse": mse}

    def sparse_select(self, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int,
                      ops: LatentOps = LOCAL
                      ) -> tuple[Any, torch.Tensor, torch.Tensor, ExtraCodes | None]:
        """Training's selection from each token's candidates: (the encoder's code; its values
        (batch, m) zeroed where not among the batch's k x batch largest; the selected values
        over every latent shard, for θ; the codes of the tokens that hold more, or None).

        The candidates are each token's m = candidate_factor x k largest pre-activations (the
        sparse kernels' encoder; on a latent shard its own latents' m largest, the same m on
        every shard since shards are equal), so no (batch, d_sae) block is selected from,
        decoded or differentiated. Exact: an element outside its token's m candidates is at most
        the token's smallest candidate, so it can be selected only if all m candidates are, the
        smallest one positive. Those tokens (on any shard) are encoded again over all latents
        and the selection is made once more over both sets, so it equals the dense one (ties
        aside). Such tokens are few but real: on SmolLM2 layer 15 the massive-activation rows
        (33 of 4,096, over 10x the median norm) took up to 719 latents each at k=16, which
        with a whole-batch re-encode at doubling m cost ~7 encoder GEMMs a step.
        """
        n_keep = (ops.k or self.k) * x.shape[0]
        m = min(self.d_sae, self.candidate_factor * (ops.k or self.k))
        code = self.sparse_encode(x, m, dead, k_aux, ops)
        cand = code.values.detach()  # (batch, m), after ReLU
        keep, selected = self._keep(cand.flatten(), n_keep, ops)
        keep = keep.view_as(cand)
        full = keep.all(1) & (cand.min(1).values > 0)  # tokens that may hold more
        if ops.sharded:  # the union over shards: every shard re-encodes the same rows
            full = ops.sum(full.to(cand.dtype)) > 0
        if m == self.d_sae or not bool(full.any()):
            return code, torch.where(keep, code.values, torch.zeros_like(code.values)), \
                selected, None
        rows = full.nonzero().squeeze(1)  # (r,)
        more = self.sparse_encode(x[rows], self.d_sae, None, 0, ops)  # (r, d_sae): all latents
        pool = torch.cat([cand.masked_fill(full[:, None], 0.0).flatten(),
                          more.values.detach().flatten()])
        keep, selected = self._keep(pool, n_keep, ops)
        first, second = keep[:cand.numel()].view_as(cand), keep[cand.numel():].view_as(more.values)
        values = torch.where(first & ~full[:, None], code.values, torch.zeros_like(code.values))
        extra = ExtraCodes(rows, torch.where(second, more.values, torch.zeros_like(more.values)),
                           more.indices)
        return code, values, selected, extra

    @staticmethod
    def _keep(pool: torch.Tensor, n_keep: int, ops: LatentOps
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of `pool` (n,): its entries among the n_keep largest over every shard's pool,
        those values). A shard's share of them lies among its own n_keep largest."""
        top, where = pool.topk(min(n_keep, pool.numel()), sorted=False)
        sel = ops.select(top[None], n_keep)
        keep = torch.zeros(pool.numel(), dtype=torch.bool, device=pool.device)
        keep[where if sel is None else where[sel[0][0]]] = True
        return keep, (top if sel is None else sel[1][0])

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0, ops: LatentOps = LOCAL,
             target: torch.Tensor | None = None) -> SAEOutput:
        # sparsity_scale is accepted for a uniform training loop; k fixes the sparsity here.
        if self.training and self.sparse_training:
            k_aux = self.k_aux(dead, ops)
            code, values, selected, extra = self.sparse_select(x, dead, k_aux, ops)
            self.update_threshold(selected)
            return self.codes_loss(x, target, values, code, k_aux, ops, extra, dead)
        pre = self.pre_acts(x, ops)  # (batch, d_sae)
        if self.training:
            f, selected = self.batch_select(pre, ops)
            self.update_threshold(f if not ops.sharded else selected)
        else:
            f = self.threshold_encode(pre)
        y = self.target_of(x, target)  # (batch, d_out)
        x_hat, loss, terms = self.reconstruction_loss(x, y, f, ops)
        if dead is not None and self.k_aux(dead, ops) > 0:
            terms["auxk"] = self._auxk(y - x_hat.detach(), pre, dead, ops)
            loss = loss + self.auxk_coefficient * terms["auxk"]
        counts = (f > 0).sum(0)  # (d_sae,)
        return SAEOutput(loss=loss, x_hat=x_hat, terms=terms, fired=counts > 0, counts=counts)

    # ---- export: SAELens 'jumprelu' with a per-latent threshold -------------------------------
    def saelens_cfg(self) -> dict[str, Any]:
        return {"architecture": "jumprelu"}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold.expand(self.d_sae)}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold")  # (d_sae,), one value broadcast by saelens_tensors
        if not bool((threshold == threshold[0]).all()):
            raise ValueError(f"{self.kind} needs one threshold shared by all latents, got "
                             f"values from {float(threshold.min())} to {float(threshold.max())}")
        super().load_saelens_tensors({**tensors, "threshold": threshold[0]})
        self.threshold_updates = 1  # a loaded θ is an estimate: further training averages into it

    def extra_state(self) -> dict[str, Any]:
        return {"k": self.k, "auxk_coefficient": self.auxk_coefficient,
                "threshold_momentum": self.threshold_momentum}
