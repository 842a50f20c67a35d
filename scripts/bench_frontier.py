"""The TopK frontier against EleutherAI's sparsify: same batches, one run (issue 18).

    dsae-harvest out_dir=runs/bench440 data.n_tokens=450560        # 400k train + 40k held out
    PYTHONPATH=/tmp/sparsify_pkg python scripts/bench_frontier.py --store runs/bench440/store \
        --json docs/results/cpu_frontier.json

(sparsify as in scripts/bench_vs_sparsify.py's docstring.) For every k in --ks x width in
--widths, three trainers see the same scaled batches of SmolLM2 layer 15's residual, in the same
order, preloaded (neither pays for reading; each time covers its steps only), in lockstep
(batch i goes to all three before batch i + 1, so a drift in the machine's speed is shared):
  * ours: BankTrainer with train.optimizer=adam (warm-up, decay, AuxK over 50k tokens);
  * ours_signum: BankTrainer with train.optimizer=signum_sf (what `auto` gives TopK members);
  * sparsify: its SparseCoder and Trainer defaults (schedule-free SignSGD, FVU loss).
Then on the held-out tail: FVU over all rows and over ordinary rows (norm under --ordinary x the
median row norm: the massive-activation rows hold most of the variance, see docs/training.md's
Outliers), L0, dead fraction, and the language model's loss with each SAE spliced in (loss
recovered, KL: one clean pass shared by all SAEs, spliced passes resumed at layer 15). Each
point also times the encoder GEMM alone (batch x d @ d x width, the step's floor). Prints the
table and, per point, ours' tokens/s over sparsify's. --speed-only skips the held-out part.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from bench_vs_plain import HOOK, ours_bank, ours_result, train_batches
from bench_vs_sparsify import sparsify_as_ours, sparsify_start

from distributed_sae.config import ModelConfig
from distributed_sae.eval import evaluate_saes
from distributed_sae.eval.spliced import contexts_from_rows, spliced_loss
from distributed_sae.models import load_model
from distributed_sae.sae import TopKSAE
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.train import input_scale

TRAINERS = ("ours", "ours_signum", "sparsify")


def gemm_seconds(x: torch.Tensor, width: int, repeats: int = 5) -> float:
    """Min seconds of the encoder GEMM alone, (batch, d) @ (d, width): the step's floor."""
    w = (torch.randn(x.shape[1], width) * x.shape[1] ** -0.5).to(x.dtype)
    x @ w  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - start)
    return best


def train_point(data: list[torch.Tensor], width: int, k: int, mean: torch.Tensor,
                store: str) -> dict[str, tuple[float, TopKSAE]]:
    """Each trainer's (seconds, SAE) at one (width, k), trained in lockstep: batch i goes to
    every trainer before batch i + 1 does, and each trainer's seconds sum its own steps. The
    build machines' speed drifts by 15-30% over minutes (2-core AMD EPYC, 2026-12-07: the same
    signum run took 16.1 s and 20.8 s an hour apart, while sparsify's did not move), so
    trainers timed one after another compare a moment against another; in lockstep each
    drift is shared. Every trainer still sees the batches in the same order."""
    d = data[0].shape[1]
    banks = {name: ours_bank(data, width, k, None, mean, store, opt)
             for name, opt in (("ours", "adam"), ("ours_signum", "signum_sf"))}
    sp_sae, sp_opt, sp_step = sparsify_start(d, width, k, mean)
    steps = {"ours": functools.partial(banks["ours"].step, record=False),
             "ours_signum": functools.partial(banks["ours_signum"].step, record=False),
             "sparsify": sp_step}
    seconds = dict.fromkeys(TRAINERS, 0.0)
    for x in data:
        for name in TRAINERS:
            start = time.perf_counter()
            steps[name](x)
            seconds[name] += time.perf_counter() - start
    saes = {name: ours_result(bank)[0] for name, bank in banks.items()}
    saes["sparsify"] = sparsify_as_ours(sp_sae, sp_opt)
    print(f"  w{width} k{k}: " + ", ".join(f"{n} {seconds[n]:.1f} s" for n in TRAINERS),
          flush=True)
    return {name: (seconds[name], saes[name]) for name in TRAINERS}


def held_out(store: ActivationStore, rows: range, ordinary: float
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """(all held-out rows, the ordinary ones, as 4096-row batches; the norm bound)."""
    reader = ActivationReader(store, HOOK, rows, 4096, shuffle=False, drop_last=False,
                              exclude_token_ids=store.metadata["exclude_token_ids"])
    x = torch.cat(list(reader))  # (rows, d) raw activations
    norms = x.norm(dim=1)
    bound = float(norms.median()) * ordinary
    keep = x[norms < bound]
    return list(x.split(4096)), list(keep.split(4096)), bound


class HeldOut:
    """The held-out rows (all, ordinary) and contexts, and the model, loaded once for all points."""

    def __init__(self, store: ActivationStore, held: range, ordinary: float,
                 eval_contexts: int | None) -> None:
        self.every, self.common, self.bound = held_out(store, held, ordinary)
        self.model = load_model(ModelConfig(name=store.metadata["model_name"]))
        self.contexts = contexts_from_rows(store, held, eval_contexts)
        self.ignore = store.metadata["exclude_token_ids"]

    def evaluate(self, saes: list[TopKSAE]) -> list[dict[str, float]]:
        """Per SAE: FVU (all, ordinary rows), L0, dead fraction, spliced loss."""
        on_all = evaluate_saes(saes, self.every)
        on_common = evaluate_saes(saes, self.common)
        spliced = spliced_loss(self.model, saes, HOOK, self.contexts, batch_size=8,
                               ignore_token_ids=self.ignore)
        rows = []
        for a, c, s in zip(on_all, on_common, spliced):
            rows.append({"fvu": a["fvu"], "fvu_ordinary": c["fvu"], "l0": a["l0"],
                         "dead_fraction": a["dead_fraction"], "ordinary_norm_bound": self.bound,
                         "ordinary_rows": sum(len(b) for b in self.common),
                         **{key: s[key] for key in ("loss_recovered", "kl_div", "ce_spliced",
                                                    "ce_clean", "ce_zero")}})
        return rows


def print_table(points: list[dict]) -> None:
    """The markdown tables of docs/training.md (speed columns only for --speed-only points)."""
    quality = all("fvu" in p["sparsify"] for p in points)
    head = "| k | width | trainer | tokens/s | step / GEMM |"
    print("\n" + head + (" FVU | FVU ordinary | dead | loss recovered | KL |" if quality else ""))
    print("|---" * (5 + 5 * quality) + "|")
    for p in points:
        for name in TRAINERS:
            r = p[name]
            line = (f"| {p['k']} | {p['width']} | {name} | {r['tokens_per_s']:,.0f} | "
                    f"{r['step_over_gemm']:.2f} |")
            if quality:
                line += (f" {r['fvu']:.3f} | {r['fvu_ordinary']:.3f} | {r['dead_fraction']:.3f} |"
                         f" {r['loss_recovered']:.3f} | {r['kl_div']:.3f} |")
            print(line)
    print("\n| k | width | ours / sparsify tokens/s | ours_signum / sparsify |" + (
        " loss recovered ours - sparsify | ours_signum - sparsify |" if quality else ""))
    print("|---" * (4 + 2 * quality) + "|")
    for p in points:
        line = (f"| {p['k']} | {p['width']} | {p['ours_over_sparsify']:.2f} | "
                f"{p['ours_signum_over_sparsify']:.2f} |")
        if quality:
            sp = p["sparsify"]["loss_recovered"]
            line += (f" {p['ours']['loss_recovered'] - sp:+.4f} | "
                     f"{p['ours_signum']['loss_recovered'] - sp:+.4f} |")
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--widths", type=int, nargs="+", default=[2304, 4608, 9216])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--eval-contexts", type=int, default=None,
                    help="spliced loss on the first N held-out contexts (default: all)")
    ap.add_argument("--ordinary", type=float, default=10.0,
                    help="ordinary rows: norm under this multiple of the median")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--speed-only", action="store_true",
                    help="train and time only: no held-out evaluation (no model load, no FVU, "
                         "no spliced loss), e.g. to measure tokens/s on another machine")
    args = ap.parse_args()

    store = ActivationStore.open(args.store)
    train_rows, held = split_rows(store, args.eval_tokens / store.n_tokens)
    scale, mean = input_scale(store, HOOK)
    data = train_batches(store, train_rows, args.batch, scale)
    tokens = len(data) * args.batch
    print(f"{len(data)} batches of {args.batch} ({tokens} tokens); {len(held)} held-out "
          f"tokens; {torch.get_num_threads()} threads", flush=True)
    evaluation = None if args.speed_only else HeldOut(store, held, args.ordinary,
                                                      args.eval_contexts)
    points = []
    for k in args.ks:
        for width in args.widths:
            points.append(run_point(data, width, k, mean, scale, args.store, evaluation))
            if args.json:  # after every point: a long grid cut short keeps what it measured
                with open(args.json, "w") as fh:
                    json.dump({"args": vars(args), "tokens": tokens,
                               "threads": torch.get_num_threads(), "points": points}, fh, indent=1)
    print_table(points)


def run_point(data: list[torch.Tensor], width: int, k: int, mean: torch.Tensor, scale: float,
              store: str, evaluation: HeldOut | None) -> dict:
    """Train the three trainers at (width, k), time the GEMM, evaluate on the held-out rows
    (unless `evaluation` is None)."""
    trained = train_point(data, width, k, mean, store)
    tokens = len(data) * data[0].shape[0]
    gemm = gemm_seconds(data[0], width)
    point: dict = {"k": k, "width": width, "gemm_s": gemm}
    saes = []
    for name, (seconds, sae) in trained.items():
        sae.eval()
        sae.fold_input_scale(scale)  # all now act on raw activations
        saes.append(sae)
        point[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds,
                       "step_over_gemm": seconds / len(data) / gemm}
    for name, metrics in zip(trained, evaluation.evaluate(saes) if evaluation else []):
        point[name].update(metrics)
    point["ours_over_sparsify"] = point["sparsify"]["seconds"] / point["ours"]["seconds"]
    point["ours_signum_over_sparsify"] = (point["sparsify"]["seconds"]
                                          / point["ours_signum"]["seconds"])
    print(f"  w{width} k{k}: " + ", ".join(
        f"{n} {point[n]['tokens_per_s']:,.0f} tok/s" + (
            f" LR {point[n]['loss_recovered']:.4f} FVUo {point[n]['fvu_ordinary']:.3f}"
            if evaluation else "") for n in TRAINERS) + f"; ours_signum / sparsify "
          f"{point['ours_signum_over_sparsify']:.2f}", flush=True)
    return point

if __name__ == "__main__":
    main()
