"""Streamed (harvest and train at once) against harvest-then-train, for the same tokens.

    python scripts/bench_stream.py [--tokens 98304] [--widths 16384 16384 16384] \
        [--out /tmp/bench_stream] [--json docs/results/cpu_stream.json] [-- more overrides]

One harvest actor (1 CPU reserved from Ray, 1 torch thread) and one trainer (train.cpus=1: one
torch thread) on the default model (SmolLM2-135M) and corpus. Three phases, each a fresh process
timed from inside (run_stages: Ray start, model load and store set-up included, Python imports
not), one after another so that they never share the machine:

    harvest   dsae-harvest into store A
    train     dsae-train on store A (its one pass)
    stream    dsae-run stream=true's harvest + train into store B (eval and export not run)

The targets (issue "Streaming"): stream <= 0.6 x (harvest + train), the overlap, and stream <=
1.15 x max(harvest, train). The bank's widths set the training's share: pick them so that
training alone takes about as long as the harvest alone on the machine (the overlap can then
save up to half). Both streamed runs' trained-row ledgers must equal the cached one's count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PHASES = {"harvest": ("harvest",), "train": ("train",), "stream": ("harvest", "train")}


def phase_main(name: str, overrides: list[str]) -> None:
    """Child process: compose the config, run the phase's stages, print its wall time."""
    from hydra import compose, initialize_config_module

    from distributed_sae.cli import run_stages, to_run_config
    from distributed_sae.config.register import register_configs

    register_configs()
    with initialize_config_module("distributed_sae.conf", version_base=None):
        cfg = to_run_config(compose("config", overrides=overrides))
    start = time.perf_counter()
    run_stages(cfg, PHASES[name])
    print(json.dumps({"phase": name, "seconds": time.perf_counter() - start}))


def run_phase(name: str, overrides: list[str]) -> float:
    cmd = [sys.executable, __file__, "--phase", name, "--", *overrides]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"phase {name} failed:\n{proc.stderr[-4000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=sorted(PHASES))
    ap.add_argument("--tokens", type=int, default=98_304)
    ap.add_argument("--widths", type=int, nargs="+", default=[16384, 16384, 16384])
    ap.add_argument("--out", default="/tmp/bench_stream")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.phase:
        phase_main(args.phase, args.overrides)
        return
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = [f"data.n_tokens={args.tokens}", "harvest.num_actors=1", "harvest.cpus_per_actor=1",
              "train.cpus=1", "cluster.num_cpus=2", f"sae.widths=[{','.join(map(str, args.widths))}]",
              *args.overrides]
    cached = common + [f"out_dir={out / 'cached'}"]
    streamed = common + [f"out_dir={out / 'streamed'}", "stream=true"]
    times = {"harvest": run_phase("harvest", cached), "train": run_phase("train", cached),
             "stream": run_phase("stream", streamed)}
    ledgers = {k: json.loads((out / k / "train" / "trained_rows.json").read_text())
               for k in ("cached", "streamed")}
    total, slower = times["harvest"] + times["train"], max(times["harvest"], times["train"])
    result = {"tokens": args.tokens, "widths": args.widths, "seconds": times,
              "stream_over_sum": times["stream"] / total,
              "stream_over_slower": times["stream"] / slower,
              "trained_rows": {k: v["rows"] for k, v in ledgers.items()},
              "cpu": _cpu_name(), "overrides": args.overrides}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return "unknown"


if __name__ == "__main__":
    main()
