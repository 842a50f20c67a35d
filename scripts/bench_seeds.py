"""Seed-to-seed spread against the gap to sparsify at chosen frontier points (issue 18, item 1).

    dsae-harvest out_dir=runs/bench440 data.n_tokens=450560      # once
    PYTHONPATH=/tmp/sparsify_pkg python scripts/bench_seeds.py --store runs/bench440/store \
        --points 16x2304 32x2304 --seeds 0 1 2 3 --json docs/results/cpu_seed_spread.json

bench_frontier.py trains each trainer once per point, so a difference of 0.002 in loss recovered
cannot tell a real gap from the luck of one random start (sparsify's own figure moved by 0.0019
between two runs). Here, at each k x width, sparsify (its defaults, started by
torch.manual_seed(seed)) and our TopK member (signum_sf, today's defaults, member seed `seed`;
also from each --norms encoder norm) are each trained from every --seed on the same batches,
and evaluated on the same held-out rows and contexts as bench_frontier.py. Prints, per point,
each trainer's mean and sample standard deviation of loss recovered, and ours minus sparsify
with the standard error of that difference of means (unpaired: the seeds of the two trainers
are unrelated); the JSON has KL, FVU (all and ordinary rows) and dead fractions too.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from bench_frontier import HOOK, HeldOut
from bench_init import run_ours
from bench_vs_plain import train_batches
from bench_vs_sparsify import run_sparsify

from distributed_sae.store import ActivationStore, split_rows
from distributed_sae.train import input_scale

METRICS = ("loss_recovered", "kl_div", "fvu_ordinary", "fvu", "dead_fraction")


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_point(data, k: int, width: int, mean, scale: float, args, held: HeldOut) -> dict:
    """Every seed of both trainers at one point, evaluated together."""
    norms = {"ours": None, **{f"ours_norm{n:g}": n for n in args.norms}}
    runs: dict[str, list] = {"sparsify": [], **{name: [] for name in norms}}
    if args.raw:
        runs["ours_raw"] = []
    for seed in args.seeds:
        torch.manual_seed(seed)  # sparsify's SparseCoder draws its start from torch's RNG
        runs["sparsify"].append(run_sparsify(data, width, k, mean))
        for name, norm in norms.items():
            sec, sae = run_ours(data, width, k, mean, norm, args.store, None, seed=seed,
                                unit_decoder=not (args.raw and norm is None))
            if args.raw and norm is None:  # the same run, saved both ways (to_saved's step)
                runs["ours_raw"].append((sec, sae))
                sae = copy.deepcopy(sae)
                with torch.no_grad():
                    sae.normalize_decoder()
            runs[name].append((sec, sae))
        print(f"k{k} w{width} seed {seed}: " + ", ".join(
            f"{name} {runs[name][-1][0]:.1f} s" for name in runs), flush=True)
    saes = [sae for name in runs for _, sae in runs[name]]
    for sae in saes:
        sae.eval()
        sae.fold_input_scale(scale)
    metrics = iter(held.evaluate(saes))
    row: dict = {"k": k, "width": width, "seeds": list(args.seeds)}
    for name in runs:
        row[name] = [{"seed": s, "seconds": sec, **next(metrics)}
                     for s, (sec, _) in zip(args.seeds, runs[name])]
    return row


def summarise(row: dict, name: str = "ours") -> dict:
    """Means and spreads of `name` and sparsify, and name - sparsify with its standard error."""
    out: dict = {}
    for key in METRICS:
        ours = spread([r[key] for r in row[name]])
        theirs = spread([r[key] for r in row["sparsify"]])
        n = len(row["seeds"])
        out[key] = {"ours_mean": ours[0], "ours_sd": ours[1], "sparsify_mean": theirs[0],
                    "sparsify_sd": theirs[1], "diff": ours[0] - theirs[0],
                    "diff_se": ((ours[1] ** 2 + theirs[1] ** 2) / n) ** 0.5}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--points", nargs="+", default=["16x2304", "32x2304"], help="k x width")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--norms", type=float, nargs="*", default=[],
                    help="also train ours from these encoder norms (sae.encoder_init_norm)")
    ap.add_argument("--raw", action="store_true",
                    help="also evaluate ours at the raw average (train.signum_unit_decoder=false)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--eval-contexts", type=int, default=64)
    ap.add_argument("--ordinary", type=float, default=10.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    store = ActivationStore.open(args.store)
    train_rows, held = split_rows(store, args.eval_tokens / store.n_tokens)
    scale, mean = input_scale(store, HOOK)
    data = train_batches(store, train_rows, args.batch, scale)
    evaluation = HeldOut(store, held, args.ordinary, args.eval_contexts)
    rows = []
    for point in args.points:
        k, width = (int(v) for v in point.split("x"))
        t0 = time.perf_counter()
        row = run_point(data, k, width, mean, scale, args, evaluation)
        names = [name for name in row if name.startswith("ours")]
        row["summary"] = {name: summarise(row, name) for name in names}
        rows.append(row)
        for name in names:
            lr = row["summary"][name]["loss_recovered"]
            print(f"k{k} w{width} ({time.perf_counter() - t0:.0f} s): loss recovered {name} "
                  f"{lr['ours_mean']:.4f} +- {lr['ours_sd']:.4f}, sparsify "
                  f"{lr['sparsify_mean']:.4f} +- {lr['sparsify_sd']:.4f}, difference "
                  f"{lr['diff']:+.4f} (se {lr['diff_se']:.4f})", flush=True)
        if args.json:  # after every point, so a stopped run keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "points": rows}, f, indent=1)


if __name__ == "__main__":
    main()
