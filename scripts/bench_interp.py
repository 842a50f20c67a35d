"""The interp stage on a trained run: wall time, LLM usage and the score distributions.

    python scripts/bench_interp.py --out-dir runs/demo [--json docs/results/cpu_interp.json] \
        [-- interp.features=50 interp.neurons=50 ...]

Runs `dsae-interp out_dir=<out-dir>` in process (same config as the command; the offline local
model by default) and writes one JSON: the wall time, the usage (requests, cached, tokens) and
per member / baseline the mean and median of each scorer, from out_dir/interp/summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", required=True, help="a run with train/ (and store/)")
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = ap.parse_args()

    from hydra import compose, initialize_config_module

    from distributed_sae.cli import run_stages, to_run_config
    from distributed_sae.config.register import register_configs

    logging.basicConfig(level=logging.INFO)
    register_configs()
    with initialize_config_module("distributed_sae.conf", version_base=None):
        cfg = to_run_config(compose("config", overrides=[f"out_dir={args.out_dir}",
                                                         *args.overrides]))
    start = time.perf_counter()
    run_stages(cfg, ("interp",))
    seconds = time.perf_counter() - start
    summary = json.loads((Path(args.out_dir) / "interp" / "summary.json").read_text())
    pick = ("n", "mean", "median")
    keys = summary.get("keys", summary["scorers"])  # with detection_auc / fuzzing_auc
    result = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{len(__import__('os').sched_getaffinity(0))} CPUs",
        "overrides": args.overrides, "seconds": round(seconds, 1), "usage": summary["usage"],
        "members": {m: {s: {k: v[s].get(k) for k in pick} for s in keys}
                    for m, v in summary["members"].items()},
        "baselines": {b: {s: {k: v[s].get(k) for k in pick} for s in keys}
                      for b, v in summary["baselines"].items()},
        "by_width": summary["by_width"]}
    text = json.dumps(result, indent=1)
    logging.getLogger("bench_interp").info("%s", text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
