"""Data-parallel training: 2 gloo ranks give the same run as 1 process with the same global batch.

The core checks spawn 2 processes (torch.multiprocessing, gloo) and feed them halves of the same
synthetic global batches that a single process trains on: per-step losses, dead-latent counters
and final weights must match, for DDP and for ZeRO-2 (DeepSpeed). The bank has a 96-wide member
(no dead latents) and a 512-wide one whose latents start dying after 2 steps (dead_tokens = 2
global batches), so AuxK is off at the start and on for most of the run.

Tolerance: the runs differ only in fp32 summation order (one 128-row mean and its gradient vs two
64-row ones averaged; ZeRO-2 also steps Adam on flat partitions). Measured over 40 steps: losses
within 2.2e-7 relative, weights within 1.6e-6 absolute (on O(0.1..1) weights), ranks bit-equal.
Asserted: rtol 1e-5 on losses, atol 5e-5 on weights: ~30x above that drift, far below real bugs,
measured: without the W_dec gradient projection hook losses are off by 5e-2 and weights by 8e-2;
without refreshing ZeRO-2's fp32 master copy after renormalisation, 2e-3 and 7.5e-3; with AuxK's
per-rank normaliser left uncorrected (parallel/data_parallel.py global_loss), 3.5e-2 and 3e-2.
A TopK near-tie flipping would also show up here as a failure, not pass silently.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import sparse_batches

from distributed_sae.config import (
    DataConfig, EvalConfig, HarvestConfig, RunConfig, SAEConfig, StoreConfig, TrainConfig,
)
from distributed_sae.sae import expand_bank
from distributed_sae.train.bank_trainer import BankTrainer

HOOK = "blocks.0.hook_resid_post"
D, BATCH, STEPS = 32, 128, 40


def make_cfg(kind: str = "topk", dead_tokens: int = 10**9, widths=(96,), store_path="unused",
             out_dir="unused", **train_kw) -> RunConfig:
    return RunConfig(
        harvest=HarvestConfig(hooks=[HOOK], contexts_per_unit=8),
        store=StoreConfig(path=store_path, chunk_tokens=128),
        data=DataConfig(context_size=64),
        sae=SAEConfig(kind=kind, widths=list(widths), k=4),
        train=TrainConfig(batch_size=BATCH, lr=3e-3, dead_tokens=dead_tokens, warmup_steps=5,
                          holdout_fraction=0.25, log_every=10, **{"optimizer": "adam", **train_kw}),
        eval=EvalConfig(spliced=False, features=False),  # synthetic: there is no model
        out_dir=out_dir)


def global_batches(steps: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    """Sparse synthetic activations (sums of 3 of 96 directions), (BATCH, D) per step."""
    return sparse_batches(steps, BATCH, D, 96, seed)


def run_bank(bank: BankTrainer, batches: list[torch.Tensor], rank: int = 0,
             world: int = 1) -> dict:
    """Train on this rank's slice of each global batch; losses per step, final state."""
    losses, dead_counts = [], []
    share = BATCH // world
    for x in batches:
        bank.step(x[rank * share:(rank + 1) * share])
        losses.append([m.last["loss"] for m in bank.members])
        dead_counts.append([m.since_fired.clone() for m in bank.members])
    return {"losses": torch.tensor(losses, dtype=torch.float64),
            "params": [{k: v.detach().clone() for k, v in m.sae.state_dict().items()}
                       for m in bank.members],
            "since_fired": [m.since_fired.clone() for m in bank.members],
            "since_fired_steps": dead_counts}


def single(kind: str, dead_tokens: int, batches: list[torch.Tensor], widths=(96,)) -> dict:
    cfg = make_cfg(kind, dead_tokens, widths)
    bank = BankTrainer(cfg, expand_bank(cfg.sae, HOOK), D, torch.zeros(D), len(batches))
    return run_bank(bank, batches)


def _worker(rank: int, world: int, port: int, strategy: str, kind: str, dead_tokens: int,
            widths: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    from distributed_sae.parallel import destroy_group, init_group
    from distributed_sae.parallel.placed import ReplicatedPlan

    init_group(rank, world, "127.0.0.1", port, backend="gloo")
    try:
        batches = global_batches()
        cfg = make_cfg(kind, dead_tokens, widths, data_parallel=strategy)
        bank = ReplicatedPlan(cfg, cfg.bank()).build_bank(D, torch.zeros(D), len(batches))
        t0 = time.perf_counter()
        result = run_bank(bank, batches, rank, world)
        result["seconds"] = time.perf_counter() - t0
        result["tokens_seen"] = bank.tokens_seen
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears its gloo pairs down: once (1 run of many, CI on
        # the 2-core machine) rank 1 aborted with "terminate called without an active
        # exception" while rank 0 was already destroying the group.
        dist.barrier()
    finally:
        destroy_group()


def spawn(tmp_path, strategy: str, kind: str = "topk", dead_tokens: int = 10**9,
          widths=(96,)) -> list[dict]:
    from distributed_sae.parallel import free_port

    mp.spawn(_worker, args=(2, free_port(), strategy, kind, dead_tokens, tuple(widths),
                            str(tmp_path)),
             nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def assert_close_runs(a: dict, b: dict, loss_rtol: float, weight_atol: float) -> None:
    torch.testing.assert_close(a["losses"], b["losses"], rtol=loss_rtol, atol=0.0)
    for pa, pb in zip(a["params"], b["params"]):
        assert pa.keys() == pb.keys()
        for name in pa:
            torch.testing.assert_close(pa[name], pb[name], rtol=0.0, atol=weight_atol,
                                       msg=lambda m, n=name: f"{n}: {m}")


DEAD, WIDTHS = 2 * BATCH, (96, 512)


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_ranks_match_one_process(tmp_path, strategy):
    batches = global_batches()
    ref = single("topk", DEAD, batches, WIDTHS)
    ranks = spawn(tmp_path, strategy, dead_tokens=DEAD, widths=WIDTHS)
    assert ranks[0]["tokens_seen"] == STEPS * BATCH
    # AuxK really runs for the wide member, and not from the start.
    dead_at = [int((s[1] >= DEAD).sum()) for s in ref["since_fired_steps"]]
    assert dead_at[0] == 0 and sum(d > 0 for d in dead_at) > STEPS // 2, dead_at
    # Every rank holds the same weights: the same reduced gradients, the same (partitioned) Adam.
    assert_close_runs(ranks[0], ranks[1], loss_rtol=0.0, weight_atol=0.0)
    assert_close_runs(ranks[0], ref, loss_rtol=1e-5, weight_atol=5e-5)
    # Ranks agree on dead latents at every step, and with the single process.
    for s0, s1, s_ref in zip(ranks[0]["since_fired_steps"], ranks[1]["since_fired_steps"],
                             ref["since_fired_steps"]):
        for a, b, c in zip(s0, s1, s_ref):
            assert torch.equal(a, b) and torch.equal(a, c)
    # The unit-norm constraint held (ZeRO-2: the fp32 master copy was refreshed).
    norms = ranks[0]["params"][0]["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert ranks[0]["losses"][-1, 0] < 0.5 * ranks[0]["losses"][0, 0]  # it learns


def test_batchtopk_threshold_stays_identical_across_ranks(tmp_path):
    """BatchTopK selects over the batch each rank sees (k x 64 rows, not k x 128), so it is not
    the single-process run; what must hold is that the ranks stay one model: the threshold EMA
    (averaged over ranks each step), the weights and the dead counters are identical."""
    ranks = spawn(tmp_path, "ddp", kind="batchtopk", dead_tokens=DEAD, widths=WIDTHS)
    assert_close_runs(ranks[0], ranks[1], loss_rtol=0.0, weight_atol=0.0)
    for p0 in ranks[0]["params"]:
        assert float(p0["threshold"]) > 0
    for s0, s1 in zip(ranks[0]["since_fired_steps"], ranks[1]["since_fired_steps"]):
        assert all(torch.equal(a, b) for a, b in zip(s0, s1))


def test_ray_train_on_a_store(ray_local, tmp_path):
    """The production path: `train` with train.workers=2 runs Ray Train's TorchTrainer, 2 CPU
    workers each reading its own chunks of a store; rank 0 saves members that evaluate like
    single-process ones. The store has massive-activation rows, which every rank drops at the
    threshold a single process computes."""
    from conftest import write_sparse_store

    from distributed_sae.eval import evaluate
    from distributed_sae.store import split_rows
    from distributed_sae.train import input_norm, train

    store = write_sparse_store(tmp_path / "store", outlier_every=64)
    cfg = make_cfg("topk", 4096, widths=(96, 192), store_path=str(tmp_path / "store"),
                   out_dir=str(tmp_path / "out"), tokens=BATCH * 100)
    cfg.train.workers = 2
    cfg.train.outlier_norm_ratio = 5
    want = input_norm(cfg, store, split_rows(store, cfg.train.holdout_fraction)[0]).max_norm
    folders = train(cfg)
    assert [f.name for f in folders] == ["topk_w96_k4_s0", "topk_w192_k4_s1"]
    assert all((f / "sae_weights.safetensors").exists() for f in folders)
    for name, m in evaluate(cfg).items():
        assert m["fvu"] < 0.5 and m["training_tokens"] == BATCH * 100, (name, m)
        assert m["outlier_max_norm"] == pytest.approx(want), (name, m)
