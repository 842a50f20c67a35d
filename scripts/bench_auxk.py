"""AuxK's two paths: sparse (batch, k_aux) codes against dense GEMMs over the dead columns.

    python scripts/bench_auxk.py [--store runs/demo/store] [--json out.json]

A TopK member's whole training step (loss with AuxK, backward) at batch 4096, d_in 576
(SmolLM2), k_aux = d_in / 2 = 288, for each width x number of dead latents: with AuxK as sparse
codes (the kernels' top k_aux among the dead, sparse decode and backward) and as
TopKSAE.aux_block_decode (five GEMMs over the n_dead columns), plus the step without AuxK,
interleaved in one run (min over --repeats). The ratio n_dead / k_aux where the two cross sets
distributed_sae.sae.topk.AUX_BLOCK_RATIO. Also checks that both give the same loss and
gradients (up to rounding: the block recomputes the dead pre-activations in its own GEMM).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_batchtopk import batch_of
from bench_kernels import time_all  # scripts/: the interleaved timer

from distributed_sae.sae import TopKSAE
from distributed_sae.sae import topk as topk_module


def step(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """One loss + backward with AUX_BLOCK_RATIO set to `ratio` (0: sparse, inf: block)."""
    saved, topk_module.AUX_BLOCK_RATIO = topk_module.AUX_BLOCK_RATIO, ratio
    try:
        sae.zero_grad(set_to_none=True)
        out = sae.loss(x, dead)
        out.loss.backward()
        return out.loss.detach()
    finally:
        topk_module.AUX_BLOCK_RATIO = saved


def same(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> bool:
    """Both paths give the same loss and gradients up to rounding."""
    results = []
    for ratio in (0.0, float("inf")):
        loss = step(sae, x, dead, ratio)
        results.append([loss] + [p.grad.clone() for p in sae.parameters()])
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store")
    ap.add_argument("--widths", type=int, nargs="+", default=[4608])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dead", type=int, nargs="+", default=[288, 576, 1152, 2304])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    x = batch_of(args.store, args.batch, 576)  # (batch, d_in)
    rows = []
    for width in args.widths:
        sae = TopKSAE(x.shape[1], width, args.k, seed=0)
        sae.train()
        for n_dead in [n for n in args.dead if n <= width]:
            dead = torch.zeros(width, dtype=torch.bool)
            dead[torch.randperm(width, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
            t = time_all({"sparse": lambda: step(sae, x, dead, 0.0),
                          "block": lambda: step(sae, x, dead, float("inf")),
                          "no_auxk": lambda: step(sae, x, None, 0.0)}, args.repeats)
            k_aux = sae.k_aux(dead)
            row = {"width": width, "n_dead": n_dead, "k_aux": k_aux,
                   "dead_over_k_aux": n_dead / k_aux, **{f"{n}_ms": s * 1e3 for n, s in t.items()},
                   "sparse_over_block": t["sparse"] / t["block"], "same": same(sae, x, dead)}
            rows.append(row)
            print(f"width {width} dead {n_dead} ({row['dead_over_k_aux']:.1f} x k_aux): "
                  f"sparse {row['sparse_ms']:.1f} ms, block {row['block_ms']:.1f} ms, "
                  f"no AuxK {row['no_auxk_ms']:.1f} ms; sparse/block "
                  f"{row['sparse_over_block']:.2f}; same {row['same']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "threads":
                                               torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
