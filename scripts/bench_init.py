"""Where signum_sf's gap to sparsify came from: the encoder's starting norm (issue 18, item 1).

    dsae-harvest out_dir=runs/bench440 data.n_tokens=450560      # once
    PYTHONPATH=/tmp/sparsify_pkg python scripts/bench_init.py --store runs/bench440/store \
        --json docs/results/cpu_init_sweep.json

Same batches and held-out evaluation as bench_frontier.py (FVU, ordinary FVU, dead fraction on
40,960 held-out tokens; spliced loss and KL on the first 64 held-out contexts). At each k x width
(--points, e.g. 16x4608): sparsify with its defaults; our TopK member (signum_sf) with its
encoder columns starting at each --norms (`sae.encoder_init_norm`), and at --seed1-norm with a
second seed (the seed-to-seed spread); and ours started from sparsify's own initial weights
(`sp_init`). A check run beforehand (random data, AuxK off) found our signum step and sparsify's
giving the same encoder bit for bit from the same start: the optimisers agree, only the start
differed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_frontier import HOOK, HeldOut
from bench_vs_plain import train_batches
from bench_vs_sparsify import load_sparsify, run_sparsify, sparsify_trainer

from distributed_sae.config import HarvestConfig, RunConfig, SAEConfig, StoreConfig, TrainConfig
from distributed_sae.sae import sae_member
from distributed_sae.store import ActivationStore, split_rows
from distributed_sae.train import BankTrainer, input_scale
from distributed_sae.train.optim import to_saved


def run_ours(data: list[torch.Tensor], width: int, k: int, mean: torch.Tensor, norm: float,
             store: str, dead_tokens: int, seed: int = 0, start: object = None,
             unit_decoder: bool = True) -> tuple[float, object]:
    """(seconds, SAE at the weights it saves): our signum_sf member from encoder norm `norm`,
    or from `start`'s weights (a sparsify SparseCoder) when given; unit_decoder=False keeps the
    raw average's decoder (train.signum_unit_decoder)."""
    cfg = RunConfig(harvest=HarvestConfig(hooks=[HOOK]), store=StoreConfig(path=store),
                    sae=SAEConfig(widths=[width], k=k, encoder_init_norm=norm),
                    train=TrainConfig(batch_size=data[0].shape[0], optimizer="signum_sf",
                                      dead_tokens=dead_tokens,
                                      signum_unit_decoder=unit_decoder),
                    out_dir="unused")
    bank = BankTrainer(cfg, [sae_member(HOOK, "topk", width, seed=seed, k=k)],
                       data[0].shape[1], mean, len(data))
    m = bank.members[0]
    if start is not None:
        with torch.no_grad():
            m.sae.W_enc.copy_(start.encoder.weight.t())
            m.sae.W_dec.copy_(start.W_dec)
    t0 = time.perf_counter()
    for x in data:
        bank.step(x, record=False)
    seconds = time.perf_counter() - t0
    to_saved([m], cfg.train.signum_unit_decoder)
    return seconds, m.sae


def run_point(data, k: int, width: int, mean, scale: float, args, evaluation: HeldOut) -> dict:
    torch.manual_seed(0)
    start, _, _ = sparsify_trainer(load_sparsify(), data[0].shape[1], width, k)
    torch.manual_seed(0)  # the same start again, inside run_sparsify
    runs = {"sparsify": run_sparsify(data, width, k, mean)}
    for norm in args.norms:
        runs[f"s{norm:g}"] = run_ours(data, width, k, mean, norm, args.store, args.dead_tokens)
    runs[f"s{args.seed1_norm:g}_seed1"] = run_ours(data, width, k, mean, args.seed1_norm,
                                                   args.store, args.dead_tokens, seed=1)
    runs["sp_init"] = run_ours(data, width, k, mean, 1.0, args.store, args.dead_tokens,
                               start=start)
    saes = []
    for _, sae in runs.values():
        sae.eval()
        sae.fold_input_scale(scale)
        saes.append(sae)
    row: dict = {"k": k, "width": width}
    for (name, (seconds, _)), metrics in zip(runs.items(), evaluation.evaluate(saes)):
        row[name] = {"seconds": seconds, **metrics}
        print(f"k{k} w{width} {name:14s} LR {metrics['loss_recovered']:.4f} KL "
              f"{metrics['kl_div']:.3f} FVU {metrics['fvu']:.3f} FVUo "
              f"{metrics['fvu_ordinary']:.3f} dead {metrics['dead_fraction']:.3f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--points", nargs="+", default=["16x2304", "16x4608", "16x9216", "32x4608",
                                                    "32x9216", "64x9216"], help="KxWIDTH")
    ap.add_argument("--norms", type=float, nargs="+", default=[1.0, 3 ** -0.5, 0.3])
    ap.add_argument("--seed1-norm", type=float, default=3 ** -0.5)
    ap.add_argument("--dead-tokens", type=int, default=50_000,
                    help="AuxK's window (the recorded sweep ran with 50k, the default then)")
    ap.add_argument("--json")
    args = ap.parse_args()
    store = ActivationStore.open(args.store)
    train_rows, held = split_rows(store, 40960 / store.n_tokens)
    scale, mean = input_scale(store, HOOK)
    data = train_batches(store, train_rows, 4096, scale)
    evaluation = HeldOut(store, held, 10.0, 64)
    rows = []
    for point in args.points:
        k, width = map(int, point.split("x"))
        rows.append(run_point(data, k, width, mean, scale, args, evaluation))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "points": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
