"""A bank of many members (hooks x kinds x widths x k) as one pass against each member alone.

    python scripts/bench_bank_members.py --store <store with the hooks> \
        [--hooks blocks.5.hook_resid_post blocks.15.hook_resid_post blocks.15.hook_mlp_out] \
        [--kinds topk batchtopk --widths 1152 4608 --k 16 64 --tokens 81920 --batch 4096] \
        [--json docs/results/cpu_bank_members.json]

Both sides run the engine (train/trainer.py's `run`) in this process on the same store: the bank
once, then every member by its own pass (a bank of that one member, `sae.members=[...]`, same
seed), one after another. Timed: the training loop only (reading, stepping, logging), not the
start-up (store statistics, building members) nor saving, as the issue asks. Also: each
member's step time inside the bank against the same member alone (BankTrainer.member_seconds),
and whether its saved weights are bit-identical (they must be: same seed, same batches).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import distributed_sae.train.trainer as engine
from distributed_sae.config import (
    DataConfig, EvalConfig, HarvestConfig, RunConfig, SAEConfig, StoreConfig, TrainConfig,
)
from distributed_sae.parallel.plan import Plan
from distributed_sae.store import ActivationStore
from distributed_sae.train.bank_trainer import BankTrainer

TIMES: dict[str, float] = {}
BANKS: list[BankTrainer] = []


def timed_loop(cfg, plan, bank, *args, **kwargs):  # wraps engine._loop: times the loop alone
    bank.member_seconds = {}
    BANKS.append(bank)
    start = time.perf_counter()
    REAL_LOOP(cfg, plan, bank, *args, **kwargs)
    TIMES[cfg.out_dir] = time.perf_counter() - start


REAL_LOOP = engine._loop
engine._loop = timed_loop


def make_cfg(a: argparse.Namespace, store: ActivationStore, out: Path, **sae_kw) -> RunConfig:
    ctx = int(store.metadata["context_size"])
    return RunConfig(
        harvest=HarvestConfig(hooks=list(store.hook_points),
                              contexts_per_unit=store.unit_rows // ctx),
        data=DataConfig(context_size=ctx),
        store=StoreConfig(path=a.store, chunk_tokens=store.chunk_rows),
        sae=SAEConfig(**sae_kw),
        train=TrainConfig(tokens=a.tokens, batch_size=a.batch, log_every=10**9, seed=0),
        eval=EvalConfig(spliced=False, features=False), out_dir=str(out))


def weights(out: Path, member: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / "train" / member / "sae_weights.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--hooks", nargs="+", default=None, help="default: every hook of the store")
    ap.add_argument("--kinds", nargs="+", default=["topk", "batchtopk"])
    ap.add_argument("--widths", type=int, nargs="+", default=[1152, 4608])
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--tokens", type=int, default=81920)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    store = ActivationStore.open(a.store)
    root = Path(tempfile.mkdtemp(prefix="bench_bank_members_"))
    bank_cfg = make_cfg(a, store, root / "bank", kinds=a.kinds, widths=a.widths,
                        k=a.k if len(a.k) > 1 else a.k[0], hooks=a.hooks or store.hook_points)
    specs = bank_cfg.bank()
    engine.run(bank_cfg, Plan(bank_cfg, specs))
    in_bank = BANKS[-1].member_seconds
    rows = []
    for i, s in enumerate(specs):
        out = root / f"alone_{i}"
        entry = {"kind": s.kind, "width": s.width, "hook": s.hook, "seed": s.seed,
                 **({"k": s.k} if s.k is not None else {})}
        cfg = make_cfg(a, store, out, hooks=[s.hook], members=[entry])
        engine.run(cfg, Plan(cfg, cfg.bank()))
        alone_id = cfg.bank()[0].member_id
        got, want = weights(root / "bank", s.member_id), weights(out, alone_id)
        rows.append({"member": s.member_id, "loop_s": TIMES[str(out)],
                     "step_s_in_bank": in_bank[s.member_id],
                     "step_s_alone": BANKS[-1].member_seconds[alone_id],
                     "identical": all(torch.equal(got[k], want[k]) for k in want)})
    bank_s, alone_s = TIMES[str(root / "bank")], sum(r["loop_s"] for r in rows)
    steps = max(1, a.tokens // a.batch)
    print(f"store {a.store}: {len(specs)} members, {steps} steps of {a.batch} tokens, "
          f"torch threads {torch.get_num_threads()}")
    print("| member | step in bank (ms) | step alone (ms) | ratio | identical |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['member']} | {1e3 * r['step_s_in_bank'] / steps:.1f} | "
              f"{1e3 * r['step_s_alone'] / steps:.1f} | "
              f"{r['step_s_in_bank'] / r['step_s_alone']:.3f} | {r['identical']} |")
    print(f"bank, one pass: {bank_s:.1f} s; each member by its own pass, one after another: "
          f"{alone_s:.1f} s; ratio {bank_s / alone_s:.3f}; "
          f"all identical: {all(r['identical'] for r in rows)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "bank_s": bank_s,
                                            "alone_s": alone_s, "ratio": bank_s / alone_s,
                                            "members": rows}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
