"""Start-up cost of the default model: GGUF de-quantisation against the de-quantised cache.

    python scripts/bench_model_load.py [--json docs/results/cpu_model_load.json] [--no-harvest]

Each figure comes from a fresh Python process, so nothing is warm from an earlier load:
  load_gguf     load_model with model.cache_dir='' (de-quantise, as every actor did before)
  load_miss     the first load with a cache: de-quantise, then write the entry
  load_hit      a load read back from the entry
  tokenizer_*   load_tokenizer alone, from the GGUF and from the entry
Then, unless --no-harvest, the time from starting `dsae-harvest` (two actors, 20,480 tokens)
to its first committed unit, what a user waits for: with no cache (first_unit_no_cache), with
the warm model cache but the corpus built again (first_unit_cached, data.cache_dir=''), and with
both warm (first_unit_both_cached: the cpython corpus read from data.cache_dir too).
--harvest-only skips the load timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_TIMED = """
import json, time, sys
from distributed_sae.config.schema import ModelConfig
from distributed_sae.models.registry import load_model, load_tokenizer
cfg = ModelConfig(cache_dir=sys.argv[2])
start = time.perf_counter()
(load_tokenizer if sys.argv[1] == "tokenizer" else load_model)(cfg)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def timed_load(what: str, cache_dir: str) -> float:
    out = subprocess.run([sys.executable, "-c", _TIMED, what, cache_dir], check=True,
                         capture_output=True, text=True).stdout
    return round(json.loads(out.strip().splitlines()[-1])["seconds"], 2)


def first_unit(cache_dir: str, work: Path, corpus_cache: str = "") -> float:
    """Seconds from starting dsae-harvest to its first committed unit (then it is stopped)."""
    store = work / "store"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-c", "from distributed_sae.cli import harvest_main; harvest_main()",
           f"out_dir={work}", f"store.path={store}", f"model.cache_dir={cache_dir}",
           "data.n_tokens=20480", f"data.cache_dir={corpus_cache}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while not any((store / "_commits").glob("u*.json")):
            if proc.poll() is not None:
                raise RuntimeError(f"dsae-harvest exited {proc.returncode} before a unit")
            time.sleep(0.2)
        return round(time.perf_counter() - start, 1)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        subprocess.run(["ray", "stop", "--force"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("--no-harvest", action="store_true", help="skip the time to first unit")
    ap.add_argument("--harvest-only", action="store_true", help="skip the load timings")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsae_load_"))
    cache = str(work / "cache")
    res: dict = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs"}
    if not args.harvest_only:
        res["load_gguf"] = timed_load("model", "")
        res["load_miss"] = timed_load("model", cache)
        res["load_hit"] = timed_load("model", cache)
        res["tokenizer_gguf"] = timed_load("tokenizer", "")
        res["tokenizer_hit"] = timed_load("tokenizer", cache)
        res["load_ratio"] = round(res["load_gguf"] / res["load_hit"], 1)
    if not args.no_harvest:
        if args.harvest_only:  # fill the model entry first, so first_unit_cached finds it
            timed_load("model", cache)
        res["first_unit_no_cache"] = first_unit("", work / "h1")
        res["first_unit_cached"] = first_unit(cache, work / "h2")
        first_unit(cache, work / "h3", corpus_cache=cache)  # writes the corpus file
        res["first_unit_both_cached"] = first_unit(cache, work / "h4", corpus_cache=cache)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
