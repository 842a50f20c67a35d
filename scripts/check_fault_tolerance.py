"""Harvest fault tolerance on the real SmolLM2 with 2 actors: three stores that must agree.

    python scripts/check_fault_tolerance.py [--tokens 65536] [--out /tmp/dsae_faults]

1. clean:   an undisturbed harvest;
2. actor:   the same job, one actor SIGKILLed once 3 units are committed;
3. job:     the same job run as `dsae-harvest`, the whole process group SIGKILLed after 3
            units, then started again with the same command.
Prints, for each, whether its token ids equal the clean store's row for row and as a multiset,
and whether its activations are equal. tests/test_harvest.py checks the same on a tiny model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from distributed_sae.config import DataConfig, HarvestConfig, RunConfig, StoreConfig  # noqa: E402
from distributed_sae.harvest import harvest  # noqa: E402
from distributed_sae.store import ActivationStore  # noqa: E402

HOOK = "blocks.15.hook_resid_post"


def cfg_for(path: Path, tokens: int) -> RunConfig:
    return RunConfig(data=DataConfig(n_tokens=tokens), harvest=HarvestConfig(num_actors=2),
                     store=StoreConfig(path=str(path)), out_dir=str(path.parent))


def wait_commits(path: Path, n: int) -> None:
    while len(list((path / "_commits").glob("u*.json"))) < n:
        time.sleep(0.05)


def ray_pids(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(f"ray::{name}".encode()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def actor_kill_run(path: Path, tokens: int) -> None:
    thread = threading.Thread(target=harvest, args=(cfg_for(path, tokens),))
    thread.start()
    wait_commits(path, 3)
    victim = ray_pids("HarvestWorker")[0]
    os.kill(victim, signal.SIGKILL)
    print(f"  killed actor pid {victim} after 3 commits")
    thread.join()


def job_kill_run(path: Path, tokens: int) -> None:
    cmd = [sys.executable, "-c", "from distributed_sae.cli import harvest_main; harvest_main()",
           f"store.path={path}", f"data.n_tokens={tokens}", "harvest.num_actors=2",
           f"out_dir={path.parent}"]
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    wait_commits(path, 3)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = len(list((path / "_commits").glob("u*.json")))
    print(f"  killed the whole job after {done} commits; restarting")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def compare(name: str, path: Path, clean: ActivationStore) -> None:
    store = ActivationStore.open(path)
    a, b = clean.tokens(0, clean.n_tokens), store.tokens(0, store.n_tokens)
    rows = store.is_complete and np.array_equal(a, b)
    multiset = np.array_equal(np.sort(a), np.sort(b))
    acts = torch.equal(clean.read(HOOK, 0, clean.n_tokens), store.read(HOOK, 0, store.n_tokens))
    print(f"{name:6s} complete {store.is_complete}  tokens equal row for row {rows}  "
          f"as a multiset {multiset}  activations equal {acts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--out", default="/tmp/dsae_faults")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    clean = harvest(cfg_for(out / "clean" / "store", args.tokens))
    print(f"clean harvest done ({time.perf_counter() - start:.0f} s)")
    actor_kill_run(out / "actor" / "store", args.tokens)
    job_kill_run(out / "job" / "store", args.tokens)
    compare("actor", out / "actor" / "store", clean)
    compare("job", out / "job" / "store", clean)


if __name__ == "__main__":
    main()
