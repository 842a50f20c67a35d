"""Data parallelism for a bank member replicated over the ranks of a torch.distributed group.

Every rank holds the same SAE, reads its own share (batch / world_size rows) of each global batch
and, after backward, sees the gradient of the *global* batch's loss:

* `DDPSync` (strategy "ddp"): the gradients of all the member's parameters are flattened into one
  buffer, all-reduced (sum) and divided by the world size, then clipped (if the kind clips) and
  stepped with the member's own torch optimiser. Adam state is replicated.
* `ZeRO2Sync` (strategy "zero2"): the member becomes a DeepSpeed ZeRO-2 engine around the member's
  torch Adam (passed as an object, so no fused op is compiled); gradients are reduce-scattered and
  each rank keeps and steps only its partition of the fp32 master weights and Adam moments, then
  the parameters are all-gathered. Clipping uses DeepSpeed's `gradient_clipping`.

Unit-norm decoders: the component of W_dec's gradient along each row must go before the optimiser
step, but under ZeRO-2 `W_dec.grad` is gone after backward (moved into DeepSpeed's partitioned
buffers). The projection g -> g - (g . w) w is linear and uses only W_dec (identical on every
rank), so it commutes with the average: a tensor hook on W_dec projects each rank's gradient
during backward, before any reduction; the same hook serves both strategies. Renormalising after
the step is in-place on the (replicated) parameters; ZeRO-2 then needs its fp32 master partition
refreshed from them (`after_renorm`), otherwise the next step would write the un-normalised master
weights back.

AuxK normalises by the residual variance of the batch it sees; `global_loss` rescales each
rank's AuxK term so the averaged gradient is the global batch's (see there).

Dead latents: `reduce_fired` ORs the fired masks over the ranks and counts the global batch, so
every rank's since_fired (hence the dead mask that AuxK uses) is identical. Buffers (BatchTopK's
threshold EMA) are averaged after each step: θ <- m θ + (1 - m) mean_r(min_r), i.e. the EMA of
the ranks' mean smallest selected activation, identical on every rank.

SAE code never imports torch.distributed: everything distributed is here.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from distributed_sae.sae import SparseAutoencoder

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "zero2")


def install_parallel_grad_hook(sae: SparseAutoencoder) -> Any:
    """Project W_dec's gradient orthogonally to W_dec's rows as it is computed (a tensor hook).

    Same maths as `SparseAutoencoder.remove_parallel_grad`, applied before any gradient reduction
    or accumulation; returns the hook handle (`.remove()` undoes it).
    """
    w_dec = sae.W_dec

    def project(grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)  # (d_sae, d_in)
            return grad - (grad * w).sum(1, keepdim=True) * w

    return w_dec.register_hook(project)


class _GroupSync:
    """What both strategies share: hooks, the fired mask, buffers, logged terms."""

    def __init__(self, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        self.sae, self.opt, self.group = sae, opt, group
        self.world_size = dist.get_world_size(group)
        self._hook = install_parallel_grad_hook(sae) if sae.unit_norm_decoder else None

    def global_loss(self, out: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss to backpropagate, its terms) such that the ranks' averaged gradient is the
        gradient of the global batch's loss; x: what the member reconstructs (its target).

        MSE is a mean over equal local batches: nothing to do. AuxK (topk, batchtopk, matryoshka)
        is  S_r / V_r  with S_r the local squared error of the dead latents' reconstruction and
        V_r the local residual variance (a constant: the residual is detached). The global batch
        has  sum_r S_r / V  (V the variance of all residuals about the global mean), so this rank
        scales its AuxK term by  W V_r / V: averaged over the ranks the gradients then sum to
        grad(sum_r S_r) / V, and so do the reported values. One small all-reduce per step while
        latents are dead; V = sum_r [V_r + n_r |m_r|^2] - n |m|^2 (fp64).
        """
        auxk = out.terms.get("auxk")
        coef = getattr(self.sae, "auxk_coefficient", None)
        if auxk is None or coef is None:
            return out.loss, dict(out.terms)
        with torch.no_grad():
            residual = x - out.x_hat.detach()  # (batch, d_out), as the SAE's _auxk sees it
            v_r = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)  # the SAE's denom
            r64 = residual.double()
            n = float(r64.shape[0])
            s = r64.sum(0)  # (d_in,)
            buf = torch.cat([s, (v_r.double() + s.pow(2).sum() / n).reshape(1),
                             torch.tensor([n], dtype=torch.float64, device=x.device)])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            total_s, total_q, total_n = buf[:-2], buf[-2], buf[-1]
            v = (total_q - total_s.pow(2).sum() / total_n).clamp_min(1e-12)
            factor = (v_r.double() * self.world_size / v).to(auxk.dtype)
        loss = out.loss + coef * auxk * (factor - 1.0)
        return loss, {**out.terms, "auxk": auxk * factor}

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def after_renorm(self) -> None:
        """Called after the parameters were changed in place (decoder renormalisation)."""

    @torch.no_grad()
    def reduce_fired(self, fired: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
        """(fired (d_sae,) bool OR-ed over the ranks, rows summed over the ranks): one all-reduce."""
        buf = torch.cat([fired.to(torch.int64), torch.tensor([rows], dtype=torch.int64,
                                                             device=fired.device)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf[:-1] > 0, int(buf[-1])

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average the floating-point buffers (BatchTopK's threshold) over the ranks."""
        bufs = [b for b in self.sae.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = _flatten_dense_tensors(bufs)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        for b, v in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
            b.copy_(v)

    @torch.no_grad()
    def mean_terms(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Logged scalars averaged over the ranks (for the MSE: the global batch's MSE)."""
        names = sorted(terms)
        vals = torch.stack([torch.as_tensor(terms[n], dtype=torch.float64).reshape(())
                            for n in names])
        dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=self.group)
        return {n: float(v) / self.world_size for n, v in zip(names, vals)}


class DDPSync(_GroupSync):
    """All-reduce (average) of one flat gradient buffer per member, then the local optimiser."""

    def backward(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.sae.parameters())
        for p in params:  # a parameter unused on this rank still takes part in the reduction
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(v)

    def step(self) -> None:
        if self.sae.grad_clip is not None:
            # A latent-sharded member (parallel/latent_shard.py) clips with the norm over all its
            # shards; torch's clip would see this shard's gradients only.
            own_clip = getattr(self.sae, "clip_grad_norm_", None)
            if own_clip is not None:
                own_clip(self.sae.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.sae.grad_clip)
        self.opt.step()


def _deepspeed_cpu_setup() -> None:
    """Before importing DeepSpeed on CPU: pick its CPU accelerator and skip building the shm
    comm op (~30 s of C++ compilation that only tensor-parallel inference uses)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError) as err:
        log.debug("could not skip the shm comm build: %s", err)


def zero2_config(micro_batch: int, grad_clip: float | None) -> dict[str, Any]:
    """DeepSpeed config of one member: ZeRO-2, fp32, no accumulation, the kind's clipping."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": float(grad_clip or 0.0),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeRO2Sync(_GroupSync):
    """The member as a DeepSpeed ZeRO-2 engine (gradients and Adam state partitioned)."""

    def __init__(self, sae: SparseAutoencoder, opt: torch.optim.Optimizer, micro_batch: int,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        if group is not None:
            raise ValueError("ZeRO-2 here runs over the default group only")
        super().__init__(sae, opt, group)
        _deepspeed_cpu_setup()
        import deepspeed

        self.engine, self.zero_opt, *_ = deepspeed.initialize(
            model=sae, optimizer=opt, config=zero2_config(micro_batch, sae.grad_clip))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # reduce-scatter of the (already projected) gradients

    def step(self) -> None:
        self.engine.step()  # partitioned Adam step, then all-gather of the parameters

    def after_renorm(self) -> None:
        # The fp32 master partition is a copy: make it match the renormalised parameters.
        self.zero_opt.refresh_fp32_params()


class DataParallel:
    """The factory BankTrainer takes (`sync=`): wraps each member for `strategy` over `group`.

    micro_batch: rows each rank feeds per step (global batch / world size); DeepSpeed needs it.
    """

    def __init__(self, strategy: str = "ddp", micro_batch: int = 1,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
        if not dist.is_initialized():
            raise RuntimeError("data parallelism needs a torch.distributed group: init_group first")
        self.strategy, self.micro_batch, self.group = strategy, micro_batch, group
        self.world_size = dist.get_world_size(group)

    def wrap(self, member: Any) -> _GroupSync:
        if self.strategy == "ddp":
            broadcast_parameters(member.sae, self.group)
            return DDPSync(member.sae, member.opt, self.group)
        return ZeRO2Sync(member.sae, member.opt, self.micro_batch, self.group)


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Make every rank start from rank 0's parameters and buffers (they should be equal anyway:
    members are seeded)."""
    tensors = [t for t in [*module.parameters(), *module.buffers()]]
    if not tensors:
        return
    flat = _flatten_dense_tensors([t.float() for t in tensors])
    dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group is not None else 0,
                   group=group)
    for t, v in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(v)
