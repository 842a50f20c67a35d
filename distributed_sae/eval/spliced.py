"""Spliced language-model loss: the model's next-token loss with an SAE in place of a hook point.

For token contexts and a hook point, three kinds of forward pass (full model, LM head included):
    clean    - the model as it is                                   -> CE_clean
    zero     - the hook's activations set to 0                      -> CE_zero
    spliced  - the hook's activations replaced by the SAE's x_hat    -> CE_spliced
and per SAE
    loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)   (1 = perfect, 0 = as bad as 0)
    kl_div         = mean over tokens of KL(P_clean || P_spliced), in nats.

A bank shares work: per batch of contexts the clean and zero passes run once, then one spliced
pass per SAE; the clean log-probabilities are reused for every SAE's KL, so nothing
(batch, seq, vocab)-sized outlives its batch. The blocks below a splice's lowest changed block
run once per batch too: the clean pass records that block's input and the zero and spliced
passes resume there (models/resume.py), with results equal bit for bit to full passes.

Positions holding an ignored token (BOS, EOS, padding: tokens the SAE never trained on) keep
their clean activation in the zero and spliced passes, and a prediction counts only when both the
input token and the predicted token are not ignored. Positions whose activation norm exceeds
`max_norm` (the outliers dropped from training) also keep their clean activation; their
predictions count. The SAEs act on RAW activations (input scaling folded in, as save_sae writes
them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from distributed_sae.config.checks import parse_hook
from distributed_sae.models.architectures import arch_spec
from distributed_sae.models.hooks import _forward_kwargs, check_hooks, patch_hook
from distributed_sae.models.registry import LoadedModel
from distributed_sae.models.resume import capture_block_inputs, resume_at
from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.store.activation_store import ActivationStore

log = logging.getLogger(__name__)


def contexts_from_rows(store: ActivationStore, rows: range,
                       max_contexts: int | None = None) -> Tensor:
    """Token ids (n_ctx, context_size) int64 of the whole contexts inside store rows `rows`.

    Row r is position r % context_size of context r // context_size, so the contexts wholly
    inside [start, stop) are ceil(start / cs) .. stop // cs - 1. `max_contexts` keeps the first
    ones.
    """
    cs = store.context_size
    first, end = -(-rows.start // cs), rows.stop // cs
    if max_contexts is not None:
        end = min(end, first + max_contexts)
    if end <= first:
        raise ValueError(f"rows {rows.start}..{rows.stop} hold no whole context of {cs} tokens: "
                         f"give a range of at least {2 * cs} rows (e.g. a larger holdout)")
    ids = np.asarray(store.tokens(first * cs, end * cs), dtype=np.int64)
    if (ids < 0).any():  # fill value of token_ids: rows of an uncommitted unit
        raise ValueError(f"rows {first * cs}..{end * cs} of {store.path} include unwritten "
                         f"rows (token id -1): finish the harvest first")
    return torch.from_numpy(ids).view(end - first, cs)


def _splice_fn(sae: SparseAutoencoder | None, keep: Tensor, max_norm: float | None = None
               ) -> Callable[[Tensor], Tensor]:
    """fn for patch_hook: x_hat (or 0 when sae is None) where keep is False, x where it is True.

    keep (batch, seq) bool marks ignored-token positions, which keep their clean activation, as
    do positions whose activation norm exceeds max_norm (rows the SAEs were not trained on).
    """
    def fn(x: Tensor) -> Tensor:  # (batch, seq, d)
        clean = keep.to(x.device)  # (batch, seq)
        if max_norm is not None:
            clean = clean | (x.float().norm(dim=-1) > max_norm)
        if sae is None:
            new = torch.zeros_like(x)
        else:
            w = sae.W_dec
            flat = x.reshape(-1, x.shape[-1]).to(device=w.device, dtype=w.dtype)  # (b*seq, d)
            new = sae(flat).view(x.shape).to(device=x.device, dtype=x.dtype)
        return torch.where(clean[..., None], x, new)

    return fn


def _logprobs(loaded: LoadedModel, ids: Tensor) -> Tensor:
    """Full forward (LM head included) -> next-token log-probabilities (batch, seq, vocab) fp32."""
    spec = arch_spec(loaded.arch)
    out = loaded.model(**_forward_kwargs(loaded, spec, ids, None))
    return torch.log_softmax(out.logits.float(), dim=-1)


def _clean_terms(logp_clean: Tensor) -> tuple[Tensor, Tensor]:
    """(P_clean, sum_v P_clean log P_clean) of one batch's predicting positions, computed once
    for every pass's KL: (batch, seq-1, vocab), (batch, seq-1)."""
    lc = logp_clean[:, :-1]
    pc = lc.exp()
    return pc, (pc * lc).sum(-1)


def _batch_terms(logp: Tensor, clean: tuple[Tensor, Tensor], ids: Tensor, counted: Tensor
                 ) -> tuple[float, float]:
    """(sum of CE, sum of KL(clean || this)) over the counted predictions of one batch.

    logp (batch, seq, vocab): position p predicts token p + 1, so the last position predicts
    nothing and targets are ids[:, 1:]; clean is _clean_terms of the clean pass; counted
    (batch, seq - 1) bool. KL = sum P_c log P_c - sum P_c log P: one product over the vocab per
    pass rather than an exp, a difference and a product.
    """
    dev = logp.device  # stay where the logits are: no (batch, seq, vocab) copy to the host
    lp = logp[:, :-1]  # (batch, seq-1, vocab)
    ce = -lp.gather(-1, ids[:, 1:, None].to(dev)).squeeze(-1)  # (batch, seq-1)
    pc, neg_entropy = clean[0].to(dev), clean[1].to(dev)
    kl = neg_entropy - (pc * lp).sum(-1)  # (batch, seq-1)
    counted = counted.to(dev)
    return float(ce[counted].double().sum()), float(kl[counted].double().sum())


# A splice: given one batch's token ids (batch, seq) and its keep mask (batch, seq; positions
# that keep their clean activation), a context manager inside which the model's forward passes
# run with the member spliced in. `Splice.zero` is the ablation baseline of the same place
# (loss_recovered is measured against it); members with the same `zero_key` share its pass.
PatchFactory = Callable[[Tensor, Tensor], ContextManager[None]]


@dataclass(frozen=True)
class Splice:
    label: str  # the hook (or MLP layers) this splice replaces, for the log
    patch: PatchFactory
    zero: PatchFactory
    zero_key: tuple[Any, ...]
    # The lowest block whose computation the splice (and its zero) may change: its passes resume
    # from the clean pass's input of that block. None: full passes.
    first_layer: int | None = None


def sae_splice(loaded: LoadedModel, sae: SparseAutoencoder | None, hook: str,
               max_norm: float | None = None) -> Splice:
    """An SAE spliced in at `hook` (None: the zero ablation), its baseline the zero ablation."""
    def at(member: SparseAutoencoder | None) -> PatchFactory:
        return lambda ids, keep: patch_hook(loaded, hook, _splice_fn(member, keep, max_norm))

    return Splice(hook, at(sae), at(None), ("hook", hook, max_norm), parse_hook(hook)[0])


@torch.no_grad()
def spliced_loss(loaded: LoadedModel, saes: Sequence[SparseAutoencoder], hook: str,
                 contexts: Tensor, batch_size: int = 8,
                 ignore_token_ids: Sequence[int] = (), max_norm: float | None = None
                 ) -> list[dict[str, float | int]]:
    """Clean / zero-ablated / spliced CE, loss recovered and KL for each SAE of `saes` at `hook`.

    max_norm: positions whose activation norm exceeds it keep their clean activation in the zero
    and spliced passes (the members' outlier threshold, train.outlier_norm_ratio); their
    predictions still count.

    contexts: (n_ctx, seq) token ids. Returns one dict per SAE, in order, with keys ce_clean,
    ce_spliced, ce_zero, ce_delta (= spliced - clean), loss_recovered, kl_div, n_tokens.
    """
    check_hooks([hook], loaded.n_layers)
    return splice_losses(loaded, [sae_splice(loaded, sae, hook, max_norm) for sae in saes],
                         contexts, batch_size, ignore_token_ids)


def _pass(loaded: LoadedModel, ids: Tensor, patch: ContextManager[None], layer: int | None,
          captured: dict[int, Tensor]) -> Tensor:
    """Log-probabilities of one patched pass, resumed at `layer` from `captured` when given."""
    with patch:
        if layer is None:
            return _logprobs(loaded, ids)
        with resume_at(loaded, layer, captured[layer]):
            return _logprobs(loaded, ids)


@torch.no_grad()
def splice_losses(loaded: LoadedModel, splices: Sequence[Splice], contexts: Tensor,
                  batch_size: int = 8, ignore_token_ids: Sequence[int] = (),
                  resume: bool = True) -> list[dict[str, float | int]]:
    """spliced_loss for any splices (sae_splice, eval/replacement.py's transcoder, CLT and
    crosscoder splices): per batch one clean pass, one zero pass per distinct baseline, one
    spliced pass per splice. Returns one dict per splice, in order (keys as spliced_loss).

    resume: the zero and spliced passes run only from each splice's first_layer up, from the
    clean pass's input of that block (same results; False runs every pass whole, as a check).
    """
    _check_inputs(loaded, contexts, batch_size)
    ignore = torch.as_tensor(list(ignore_token_ids), dtype=torch.long)
    zeros: dict[tuple[Any, ...], Splice] = {}  # each baseline's pass, run by its first splice
    for s in splices:
        zeros.setdefault(s.zero_key, s)
    starts = {s.first_layer for s in splices if resume and s.first_layer is not None}
    layer_of = {id(s): s.first_layer if resume else None for s in splices}
    ce_clean, ce_zero = 0.0, dict.fromkeys(zeros, 0.0)
    ce, kl = np.zeros(len(splices)), np.zeros(len(splices))
    n = 0
    labels = ", ".join(dict.fromkeys(s.label for s in splices))
    # One bar for the bank: each batch runs the clean, zero and every member's spliced pass.
    for start in tqdm(range(0, len(contexts), batch_size), desc=f"spliced loss {labels}",
                      unit="batch", leave=False):
        ids = contexts[start:start + batch_size].long()  # (batch, seq)
        keep = torch.isin(ids, ignore)  # (batch, seq): ignored positions keep clean activations
        counted = ~keep[:, :-1] & ~keep[:, 1:]  # (batch, seq-1) predictions that count
        n += int(counted.sum())
        with capture_block_inputs(loaded, sorted(starts)) as captured:
            clean_logp = _logprobs(loaded, ids)
        clean = _clean_terms(clean_logp)
        ce_clean += _batch_terms(clean_logp, clean, ids, counted)[0]
        del clean_logp
        for key, first in zeros.items():
            logp = _pass(loaded, ids, first.zero(ids, keep), layer_of[id(first)], captured)
            ce_zero[key] += _batch_terms(logp, clean, ids, counted)[0]
        for i, splice in enumerate(splices):
            logp = _pass(loaded, ids, splice.patch(ids, keep), layer_of[id(splice)], captured)
            c, k = _batch_terms(logp, clean, ids, counted)
            ce[i] += c
            kl[i] += k
    if n == 0:
        raise ValueError("no prediction counted: every context is made of ignored tokens; "
                         "check ignore_token_ids")
    out = [_loss_summary(ce_clean / n, ce_zero[s.zero_key] / n, ce[i] / n, kl[i] / n, n)
           for i, s in enumerate(splices)]
    log.info("spliced loss at %s on %d tokens: clean %.4f, spliced %s", labels, n,
             ce_clean / n, ", ".join(f"{r['ce_spliced']:.4f}" for r in out))
    return out


def _check_inputs(loaded: LoadedModel, contexts: Tensor, batch_size: int) -> None:
    if not arch_spec(loaded.arch).causal:
        raise ValueError(f"spliced loss needs a causal LM, but {loaded.name} is {loaded.arch!r} "
                         f"(loaded without an LM head): evaluate such SAEs by FVU only")
    if contexts.dim() != 2 or contexts.shape[1] < 2:
        raise ValueError(f"contexts must be (n_ctx, seq >= 2) token ids, got shape "
                         f"{tuple(contexts.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def _loss_summary(ce_clean: float, ce_zero: float, ce_spliced: float, kl: float, n: int
                  ) -> dict[str, float | int]:
    gap = ce_zero - ce_clean
    return {"ce_clean": float(ce_clean), "ce_spliced": float(ce_spliced),
            "ce_zero": float(ce_zero), "ce_delta": float(ce_spliced - ce_clean),
            # A gap of ~0 (zero-ablating changes nothing) makes the fraction meaningless.
            "loss_recovered": float((ce_zero - ce_spliced) / gap) if abs(gap) > 1e-9
            else float("nan"),
            "kl_div": float(kl), "n_tokens": n}
