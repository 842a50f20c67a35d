"""The Towards Monosemanticity recipe with and without neuron resampling, on one store.

    python scripts/bench_resampling.py --store <store> [--width 4608 --l1 0.03 --epochs 2]

Trains the `relu` kind (recipe towards_monosemanticity: unit-norm decoder, parallel-gradient
removal) twice through the real train stage, same seeds and batches: once with resampling at
every --every steps of the first --until of the run (dead = not fired in the last --window steps), once with
train.resample_steps=[]. Then evaluates both on the held-out tokens (no model needed: FVU, L0,
dead = never fired on the held-out tokens) and prints both with the dead fraction of the training
log (not fired in the last 10M tokens, or all tokens seen). Make a store with
`dsae-harvest data.n_tokens=450560` (SmolLM2 layer 15, CPython text).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from distributed_sae.config import (EvalConfig, HarvestConfig, RunConfig, SAEConfig, StoreConfig,
                                    TrainConfig)
from distributed_sae.eval import evaluate
from distributed_sae.store import ActivationStore, split_rows
from distributed_sae.train import train


def config(a: argparse.Namespace, store: ActivationStore, out: Path, resample: bool) -> RunConfig:
    hook = a.hook or store.hook_points[0]
    train_rows, _ = split_rows(store, a.holdout)
    steps = a.epochs * len(train_rows) // a.batch
    every = list(range(a.every, int(steps * a.until), a.every)) if resample else []
    cfg = RunConfig(
        harvest=HarvestConfig(hooks=[hook], contexts_per_unit=store.unit_rows // store.context_size),
        store=StoreConfig(path=str(store.path), chunk_tokens=store.chunk_rows),
        sae=SAEConfig(kind="relu", recipe="towards_monosemanticity", widths=[a.width],
                      l1_coefficient=a.l1, seed=a.seed),
        train=TrainConfig(tokens=steps * a.batch, batch_size=a.batch, lr=a.lr, seed=a.seed,
                          holdout_fraction=a.holdout, log_every=50, resample_steps=every,
                          resample_window=a.window, resample_inputs=a.resample_inputs,
                          outlier_norm_ratio=a.outlier_ratio,
                          dead_report_tokens=a.dead_report_tokens),
        eval=EvalConfig(spliced=False, features=False, dashboard=False),
        out_dir=str(out))
    cfg.data.context_size = store.context_size
    return cfg


class Resampled(logging.Handler):
    """Collects the counts of the trainer's "resampled N dead features" lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if (m := re.search(r"resampled (\d+) dead", record.getMessage())):
            self.counts.append(int(m.group(1)))


def run(cfg: RunConfig) -> dict[str, Any]:
    counter = Resampled()
    logging.getLogger("distributed_sae").addHandler(counter)
    start = time.perf_counter()
    try:
        train(cfg)
    finally:
        logging.getLogger("distributed_sae").removeHandler(counter)
    seconds = time.perf_counter() - start
    (_, metrics), = evaluate(cfg).items()
    last = [json.loads(x) for x in
            (Path(cfg.out_dir) / "train" / "metrics.jsonl").read_text().splitlines()][-1]
    return {"fvu": metrics["fvu"], "l0": metrics["l0"], "dead_heldout": metrics["dead_fraction"],
            "dead_train_log": last["dead_fraction"], "seconds": seconds,
            "resample_steps": len(cfg.train.resample_steps), "resampled": counter.counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", default="runs/bench_resampling")
    ap.add_argument("--hook", default=None)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--l1", type=float, default=0.03, help="sae.l1_coefficient")
    ap.add_argument("--lr", type=float, default=None, help="default: the relu kind's")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", type=int, default=200, help="resample every this many steps")
    ap.add_argument("--window", type=int, default=100, help="train.resample_window (steps)")
    ap.add_argument("--until", type=float, default=0.5,
                    help="resample only in this first fraction of the run, so that revived "
                         "features have the rest of it to settle (the paper's last resampling, at "
                         "step 100k, is also followed by more training)")
    ap.add_argument("--resample-inputs", type=int, default=65536)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0, help="sae.seed and train.seed (both runs)")
    ap.add_argument("--dead-report-tokens", type=int, default=10_000_000,
                    help="train.dead_report_tokens: the training log's dead window (the issue: "
                         "10M tokens, or all tokens seen when fewer)")
    ap.add_argument("--outlier-ratio", type=float, default=0.0,
                    help="train.outlier_norm_ratio: drop rows above this multiple of the median "
                         "norm (SmolLM2's massive activations after BOS); 0 keeps all rows")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    store = ActivationStore.open(a.store)
    results = {}
    for name, resample in (("with resampling", True), ("without", False)):
        results[name] = run(config(a, store, Path(a.out) / name.split()[0], resample))
    print(f"relu towards_monosemanticity, width {a.width}, l1 {a.l1}, batch {a.batch}, "
          f"{a.epochs} epochs, lr {a.lr}, seed {a.seed}, outlier ratio {a.outlier_ratio}, "
          f"resampling every {a.every} steps (window {a.window} steps); dead (train log) = not "
          f"fired in the last {a.dead_report_tokens} tokens")
    print("| run | features resampled | FVU | L0 | dead (held-out) | dead (train log) | s |")
    for name, r in results.items():
        print(f"| {name} | {r['resampled'] or '-'} | {r['fvu']:.3f} | {r['l0']:.1f} | "
              f"{r['dead_heldout']:.4f} | {r['dead_train_log']:.4f} | {r['seconds']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
