"""Where the sparse TopK training step spends its time on a GPU, and the candidates tried against
the two slow parts that the first H100 run of bench_kernels.py --gpu showed (docs/kernels.md):

1. segment_rows (grad W_dec, and grad W_enc in its (d, n) layout): the per-latent kernel
   ("rows"), the latent-tile kernel ("tile") at several tile sizes, and cuSPARSE's CSR x dense
   product, on uniform latents and on skewed ones (Zipf-like firing: a few latents on most tokens,
   as trained SAEs have).
2. the top-k over (batch, n): torch.topk against kernels.select.grouped_topk at several group
   sizes.
3. torch.profiler's table of the whole step at the chosen settings.

    python scripts/explore_gpu_step.py [--n 131072 --d 4096 --k 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

if "--dry-run" in sys.argv:  # CPU tensors under the Triton interpreter: checks the script only
    os.environ["TRITON_INTERPRET"] = "1"

import bench_kernels_gpu as bk  # noqa: E402  (scripts/bench_kernels_gpu.py)
import torch  # noqa: E402
from bench_kernels_gpu import bench, inputs, rel_err, sae_on_gpu  # noqa: E402

from distributed_sae.kernels import select, use_backend  # noqa: E402
from distributed_sae.kernels import triton_sparse as ts  # noqa: E402
from distributed_sae.sae import sae_member  # noqa: E402
from distributed_sae.train.bank_trainer import Member, train_step  # noqa: E402

TILES = [dict(BLOCK_L=bl, BLOCK_D=bd, num_warps=nw) for bl, bd, nw in bk.TILE_SWEEP]


def skewed_indices(n: int, k: int) -> torch.Tensor:
    """(batch, k) distinct latents per token drawn with p_i ~ 1/(i + 8): latent 0 on ~60% of
    tokens at k 32, n 131072, the median latent on a few."""
    p = 1.0 / (torch.arange(n, device=bk.DEV, dtype=torch.float32) + 8)
    return torch.multinomial(p.expand(bk.BATCH, n), k, replacement=False)


def cusparse_rows(idx: torch.Tensor, v: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    order, seg = ts.latent_csr(idx, n)
    tok = order // idx.shape[1]
    f_t = torch.sparse_csr_tensor(seg, tok, v.reshape(-1)[order], size=(n, idx.shape[0]))
    return f_t @ g  # (n, d)


def segment_variants(n: int, d: int, k: int) -> list[dict[str, Any]]:
    t = inputs(n, d, k, seed=2)
    v, g = t["values"], t["g"]
    rows = []
    for law, idx in (("uniform", t["indices"]), ("skewed", skewed_indices(n, k))):
        top = int(torch.bincount(idx.reshape(-1), minlength=n).max())
        ref = torch.zeros(bk.BATCH, n, device=bk.DEV, dtype=bk.BF16).scatter_(1, idx, v).t() @ g
        calls = {"dense_matmul": lambda: ref}
        ts.SEGMENT_KERNEL = "rows"  # the per-latent kernel at its committed tiles
        calls["rows"] = lambda: ts.segment_rows(idx, v, g, n)[0]
        calls["rows_T"] = lambda: ts.segment_rows(idx, v, g, n, transposed=True)[0].t()
        calls["cusparse"] = lambda: cusparse_rows(idx, v, g, n)
        for name, call in calls.items():
            rows.append(_time(law, top, name, call, ref))
        ts.SEGMENT_KERNEL = "tile"
        for cfg in TILES:
            ts.CONFIG["segment_tile"] = cfg
            ts._TILE_FAILED = False
            for tr in (False, True):
                name = f"tile{tuple(cfg.values())}{'_T' if tr else ''}"
                call = (lambda tr=tr: ts.segment_rows(idx, v, g, n, transposed=tr)[0].t()
                        if tr else ts.segment_rows(idx, v, g, n)[0])
                rows.append(_time(law, top, name, call, ref))
        del ref
    ts.SEGMENT_KERNEL = "rows"
    return rows


def _time(law: str, top: int, name: str, call, ref: torch.Tensor) -> dict[str, Any]:
    try:
        err = rel_err(call(), ref)
        if name.startswith("tile") and ts._TILE_FAILED:
            raise RuntimeError("the tile kernel did not compile")
        ms = bench(call)
    except Exception as exc:
        print(f"{law} {name}: {exc!r}"[:200])
        return {"law": law, "name": name, "error": repr(exc)[:200]}
    print(f"segment {law} (max pairs/latent {top}) {name}: {ms:.3f} ms, rel err {err:.1e}")
    return {"law": law, "name": name, "ms": ms, "rel_err": err, "max_pairs": top}


def topk_variants(k: int) -> list[dict[str, Any]]:
    rows = []
    for n in ((131072, 1048576) if bk.DEV == "cuda" else (4096,)):
        pre = torch.randn(bk.BATCH, n, device=bk.DEV, dtype=bk.BF16)
        want = pre.topk(k, dim=-1).values.sort(-1).values
        for group in (1, 8, 16, 32, 64, 128):
            call = (lambda g=group: select.grouped_topk(pre, k, group=g))
            same = torch.equal(call()[0].sort(-1).values, want)
            ms = bench(call)
            rows.append({"n": n, "group": group, "ms": ms, "same_values": same})
            print(f"topk n={n} group={group}: {ms:.3f} ms, same values {same}")
        del pre
    return rows


def profile_step(n: int, d: int, k: int) -> str:
    sae = sae_on_gpu(d, n, k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    member = Member(sae_member("h", "topk", n, seed=0, k=k), sae, opt,
                    torch.zeros(n, dtype=torch.long, device=bk.DEV))
    x = torch.randn(bk.BATCH, d, device=bk.DEV, dtype=bk.BF16)
    cuda = bk.DEV == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with use_backend("triton"):
        step_ms = bench(lambda: train_step(member, x, 1e-4, 1.0, 10**9))
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(3):
                train_step(member, x, 1e-4, 1.0, 10**9)
            if cuda:
                torch.cuda.synchronize()
    averages = prof.key_averages()
    try:
        table = averages.table(sort_by="device_time_total" if cuda else "cpu_time_total",
                               row_limit=18, max_name_column_width=60)
    except (KeyError, AttributeError, ValueError):
        table = averages.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print(f"step {step_ms:.3f} ms (segment {ts.SEGMENT_KERNEL}, topk group {select._GROUP_CUDA})")
    print(table)
    return f"step {step_ms:.3f} ms\n" + table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes")
    args = ap.parse_args()
    if args.dry_run:
        bk.dry_run()
        args.n, args.d, args.k = 256, 40, 4
    out: dict[str, Any] = {"device": bk.DEV}
    out["segment"] = segment_variants(args.n, args.d, args.k)
    out["topk"] = topk_variants(args.k)
    timed = [r for r in out["segment"] if r.get("name", "").startswith("tile") and "ms" in r
             and r["law"] == "skewed" and r["rel_err"] < 1e-2]
    if timed:  # the profile with the tile kernel that did best on skewed latents
        best = min(timed, key=lambda r: r["ms"])["name"]
        ts.CONFIG["segment_tile"] = TILES[[f"tile{tuple(c.values())}" for c in TILES]
                                          .index(best.removesuffix("_T"))]
        ts.SEGMENT_KERNEL = "tile"
    groups = [r for r in out["topk"] if r["n"] == args.n and r["same_values"]]
    select._GROUP_CUDA = min(groups, key=lambda r: r["ms"])["group"] if groups else 0
    out["profile"] = profile_step(args.n, args.d, args.k)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
