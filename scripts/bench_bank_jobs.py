"""A bank trained as one job against its members trained as one job each, one after another.

    python scripts/bench_bank_jobs.py --store <store> [--widths 1152 2304 4608 9216 --tokens 204800]

This is how a width sweep runs without a bank: `dsae-train` once per width, each job reading
the whole store, starting its own process (imports, store statistics, reader threads) and saving
its member. The bank runs `dsae-train sae.widths=[...]` once. Both use the real CLI on the same
store with the same seeds (member i of the bank has seed i; job i runs sae.seed=i), so every
member's saved weights must be identical, which the script checks. Prints wall times and their
ratio. scripts/bench_bank.py measures the same comparison inside one process (no start-up, store
in memory), where the two are at parity on the 2-core build machine: the training FLOPs are the
same and reading is ~700x faster than training there (docs/harvest.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file


def dsae_train(out: Path, store: str, widths: list[int], seed: int, a: argparse.Namespace) -> float:
    """Wall seconds of one `dsae-train` job (a fresh process, like a user's)."""
    shutil.rmtree(out, ignore_errors=True)  # no checkpoint of an earlier run to resume from
    exe = Path(sys.executable).parent / "dsae-train"
    cmd = [str(exe), f"out_dir={out}", f"store.path={store}",
           f"sae.widths=[{','.join(map(str, widths))}]", f"sae.seed={seed}", f"sae.k={a.k}",
           f"train.tokens={a.tokens}", f"train.batch_size={a.batch}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def weights(out: Path) -> dict[str, dict]:
    return {f.parent.name: load_file(str(f))
            for f in sorted((out / "train").glob("*/sae_weights.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", default="runs/bench_bank_jobs")
    ap.add_argument("--widths", type=int, nargs="+", default=[1152, 2304, 4608, 9216])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=204800, help="train.tokens of every job")
    a = ap.parse_args()
    out = Path(a.out)
    bank_s = dsae_train(out / "bank", a.store, a.widths, 0, a)
    seq_s = [dsae_train(out / f"alone_{i}", a.store, [w], i, a) for i, w in enumerate(a.widths)]
    bank = weights(out / "bank")
    same = len(bank) == len(a.widths)
    for i in range(len(a.widths)):
        (name, alone), = weights(out / f"alone_{i}").items()
        same &= name in bank and all((bank[name][k] == v).all() for k, v in alone.items())
    print(f"store {a.store}, widths {a.widths}, k {a.k}, batch {a.batch}, {a.tokens} tokens each")
    print(f"bank, one job: {bank_s:.1f} s   one job per width, one after another: "
          f"{sum(seq_s):.1f} s ({', '.join(f'{s:.1f}' for s in seq_s)})   ratio "
          f"{bank_s / sum(seq_s):.3f}   identical weights per member: {bool(same)}")


if __name__ == "__main__":
    main()
