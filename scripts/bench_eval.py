"""The spliced loss with full passes against resumed passes (issue 18 item 4), on a trained run.

    scripts/demo.sh                                # or any dsae-run; then
    python scripts/bench_eval.py --run runs/demo --out docs/results/cpu_eval_spliced.json

On the run's held-out contexts (eval.spliced_tokens of them, as the eval stage picks them) and
its trained members, times in one process:
    forwards  one clean pass per batch alone (full model + log-softmax): the floor, what any
              spliced loss needs at least
    full      splice_losses(resume=False): every zero and spliced pass runs the whole model
    resumed   splice_losses(): those passes start at the splice's block (models/resume.py)
and checks that full and resumed give the same numbers. Prints the times, the ratios, and the
resumed run's time above the floor.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from distributed_sae.config import EvalConfig, ModelConfig, RunConfig, StoreConfig
from distributed_sae.eval.replacement import member_splices
from distributed_sae.eval.run import _held_out, trained_members
from distributed_sae.eval.spliced import _logprobs, contexts_from_rows, splice_losses
from distributed_sae.models import load_model
from distributed_sae.sae import load_sae
from distributed_sae.store import ActivationStore


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="out_dir of a finished dsae-run")
    ap.add_argument("--tokens", type=int, default=EvalConfig.spliced_tokens)
    ap.add_argument("--batch-size", type=int, default=EvalConfig.spliced_batch_size)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    cfg = RunConfig(out_dir=args.run, store=StoreConfig(path=f"{args.run}/store"))
    store = ActivationStore.open(cfg.store.path)
    contexts = contexts_from_rows(store, _held_out(cfg, store),
                                  max(1, args.tokens // store.context_size))
    loaded = load_model(ModelConfig(name=store.metadata["model_name"]))
    members = [(folder.name, *load_sae(folder)) for folder in trained_members(args.run)]
    splices = [s for _, sae, sae_cfg in members for _, s in member_splices(loaded, sae, sae_cfg)]
    ignore = store.metadata["exclude_token_ids"]

    timings, results = {}, {}
    with torch.no_grad():
        start = time.perf_counter()
        for i in range(0, len(contexts), args.batch_size):
            _logprobs(loaded, contexts[i:i + args.batch_size].long())
        timings["forwards"] = time.perf_counter() - start
    for name, resume in (("full", False), ("resumed", True)):
        start = time.perf_counter()
        results[name] = splice_losses(loaded, splices, contexts, args.batch_size, ignore, resume)
        timings[name] = time.perf_counter() - start
    same = results["full"] == results["resumed"]
    report = {
        "cpu": _cpu_name(), "threads": torch.get_num_threads(), "run": args.run,
        "members": [m[0] for m in members], "splices": [s.label for s in splices],
        "resume_layers": sorted({s.first_layer for s in splices if s.first_layer is not None}),
        "n_layers": loaded.n_layers, "contexts": len(contexts),
        "context_size": store.context_size, "batch_size": args.batch_size,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "resumed_over_full": round(timings["resumed"] / timings["full"], 3),
        "resumed_above_forwards_s": round(timings["resumed"] - timings["forwards"], 2),
        "identical_results": same, "results": results["resumed"],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if not same:
        raise SystemExit("full and resumed spliced losses differ")


if __name__ == "__main__":
    main()
