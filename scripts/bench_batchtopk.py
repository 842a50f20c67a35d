"""BatchTopK's training step: the selection among per-token candidates against the dense one.

    python scripts/bench_batchtopk.py [--store runs/demo/store] [--json out.json]

At batch 4096, d_in 576 (SmolLM2), for each width x k: the whole training step (loss with AuxK
on 1% dead latents, backward) with BatchTopKSAE.sparse_select (candidates: the kernels' top
candidate_factor x k per token) and with the dense selection (flat top-(k x batch) of the whole
(batch, width) block, dense decode), the TopK step and the encoder GEMM alone, interleaved in
one run (min over --repeats). Also checks that both selections keep the same activations and
counts the tokens re-encoded over all latents (those holding more than candidate_factor x k of
the batch's selection). --store takes real batches (the store's first hook, scaled as training scales it)
instead of Gaussian ones: their per-token L0 varies more.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_kernels import time_all  # scripts/: the interleaved timer

from distributed_sae.sae import TopKSAE
from distributed_sae.sae.batchtopk import BatchTopKSAE


def batch_of(store_path: str | None, rows: int, d: int) -> torch.Tensor:
    """(rows, d): the store's first training rows at the training scale, or Gaussian rows."""
    if store_path is None:
        return torch.randn(rows, d, generator=torch.Generator().manual_seed(0))
    from distributed_sae.store import ActivationReader, ActivationStore
    from distributed_sae.train import input_scale

    store = ActivationStore.open(store_path)
    hook = store.hook_points[0]
    scale, _ = input_scale(store, hook)
    reader = ActivationReader(store, hook, range(store.n_tokens), rows, seed=0, scale=scale,
                              exclude_token_ids=store.metadata["exclude_token_ids"])
    return next(iter(reader))


def point(x: torch.Tensor, width: int, k: int, repeats: int) -> dict:
    sae = BatchTopKSAE(x.shape[1], width, k, seed=0)
    topk = TopKSAE(x.shape[1], width, k, seed=0)
    dead = torch.zeros(width, dtype=torch.bool)
    dead[: width // 100] = True
    code, values, _, extra = sae.sparse_select(x, None, 0)
    sparse_f = torch.zeros(x.shape[0], width).scatter_(1, code.indices, values.detach())
    if extra is not None:  # the tokens re-encoded over all latents
        sparse_f[extra.rows] = torch.zeros(len(extra.rows), width).scatter_(
            1, extra.indices, extra.values.detach())
    dense_f = sae.batch_topk(sae.pre_acts(x)).detach()
    # The same entries kept, their values equal up to rounding: re-encoded rows come from their
    # own GEMM. (Identical activations, e.g. the token after BOS in two contexts, can tie at the
    # threshold, and either may be kept: then the kept values are compared as sorted lists.)
    a, b = sparse_f[sparse_f > 0].sort().values, dense_f[dense_f > 0].sort().values
    same = len(a) == len(b) and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5))
    re_encoded = 0 if extra is None else len(extra.rows)

    def step(model, sparse: bool):
        def run():
            model.sparse_training = sparse
            model.zero_grad(set_to_none=True)
            model.loss(x, dead=dead).loss.backward()
        return run

    t = time_all({"batchtopk_sparse": step(sae, True), "batchtopk_dense": step(sae, False),
                  "topk": step(topk, True), "gemm": lambda: sae.pre_acts(x).detach()}, repeats)
    ms = {name: v * 1e3 for name, v in t.items()}
    return {"width": width, "k": k, "ms": ms, "same_selection": same,
            "tokens_re_encoded": re_encoded,
            "dense_over_sparse": t["batchtopk_dense"] / t["batchtopk_sparse"],
            "sparse_over_gemm": t["batchtopk_sparse"] / t["gemm"],
            "topk_over_gemm": t["topk"] / t["gemm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--widths", type=int, nargs="+", default=[1152, 4608])
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    x = batch_of(args.store, args.batch, args.d)
    rows = []
    print(f"batch {x.shape[0]}, d {x.shape[1]}, {torch.get_num_threads()} threads, "
          f"{'store ' + args.store if args.store else 'Gaussian rows'}; min of {args.repeats}")
    print("| width | k | BatchTopK sparse ms | dense ms | dense / sparse | sparse / GEMM | "
          "TopK / GEMM | same | tokens re-encoded |")
    print("|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        for k in args.ks:
            r = point(x, width, k, args.repeats)
            rows.append(r)
            print(f"| {width} | {k} | {r['ms']['batchtopk_sparse']:.1f} | "
                  f"{r['ms']['batchtopk_dense']:.1f} | {r['dense_over_sparse']:.2f} | "
                  f"{r['sparse_over_gemm']:.2f} | {r['topk_over_gemm']:.2f} | "
                  f"{r['same_selection']} | {r['tokens_re_encoded']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "points": rows}, indent=1))


if __name__ == "__main__":
    main()
