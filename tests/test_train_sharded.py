"""Latent-sharded members in the train stage (parallel/sharded_plan.py through the one engine).

* 2 gloo ranks as dp 1 x tp 2, and 4 as dp 2 x tp 2, train a bank of sharded members on the same
  global batches as 1 process whose members start from the shards' concatenated initialisation:
  per-step losses, dead-latent counters and weights match (TopK with AuxK active; ReLU april_2024
  with its global gradient clip). Tolerances as in test_train_distributed.py (rtol 1e-5 on
  losses, atol 5e-5 on weights): the runs differ in fp32 summation order only.
* train_rank on a store with a checkpoint half-way; a second job resumed from that checkpoint
  ends with the same member folders; the logged dead fraction and density are over all latents.
* The production path: `train` with train.workers=2, train.latent_shards=2 through Ray Train saves
  ordinary member folders that `evaluate` scores.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from test_train_distributed import BATCH, D, HOOK, global_batches, run_bank

from distributed_sae.config import (
    DataConfig, HarvestConfig, RunConfig, SAEConfig, StoreConfig, TrainConfig,
)
from distributed_sae.parallel.collectives import ShardComm
from distributed_sae.parallel.latent_shard import latent_axis, shard_range
from distributed_sae.sae import build_sae, expand_bank
from distributed_sae.train.bank_trainer import BankTrainer

DEAD, WIDTHS, KINDS, STEPS = 2 * BATCH, (96, 512), ("topk", "relu"), 20
B_DEC = torch.linspace(-0.1, 0.1, D)  # non-zero: b_dec's gradient (summed over shards) matters


def make_cfg(kind: str, workers: int = 1, shards: int = 1, widths=WIDTHS, store_path="unused",
             out_dir="unused", dead_tokens: int = DEAD, **train_kw) -> RunConfig:
    return RunConfig(
        harvest=HarvestConfig(hooks=[HOOK], contexts_per_unit=8),
        store=StoreConfig(path=store_path, chunk_tokens=128),
        data=DataConfig(context_size=64),
        sae=SAEConfig(kind=kind, widths=list(widths), k=4, recipe="april_2024"),
        train=TrainConfig(batch_size=BATCH, lr=3e-3, dead_tokens=dead_tokens, warmup_steps=5,
                          holdout_fraction=0.25, log_every=10, workers=workers,
                          latent_shards=shards, **{"optimizer": "adam", **train_kw}),
        out_dir=out_dir)


def reference(kind: str, tp: int, batches: list[torch.Tensor]) -> dict:
    """One process, unsharded members initialised as the tp shards' slices put together."""
    from distributed_sae.parallel.sharded_plan import sharded_member_builder

    cfg = make_cfg(kind)

    def build(spec, d_in):
        shards = []
        for r in range(tp):  # a stand-in comm: building a shard runs no collective
            comm = ShardComm.single()
            comm.size, comm.rank = tp, r
            shards.append(sharded_member_builder(comm)(spec, d_in).local.state_dict())
        full = build_sae(spec, d_in)
        full.load_state_dict({
            name: t if latent_axis(name, t, spec.width) is None else
            torch.cat([s[name] for s in shards], dim=latent_axis(name, shards[0][name],
                                                                  spec.width // tp))
            for name, t in full.state_dict().items()})
        return full

    bank = BankTrainer(cfg, expand_bank(cfg.sae, HOOK), D, B_DEC, len(batches), build_member=build)
    return run_bank(bank, batches)


def _bank_runs(world: int, tp: int) -> dict:
    """Every kind's sharded bank on this rank's replica share of the global batches."""
    from distributed_sae.parallel.sharded_plan import LatentShardedPlan

    result = {}
    for kind in KINDS:
        batches = global_batches(STEPS)
        cfg = make_cfg(kind, world, tp)
        plan = LatentShardedPlan(cfg, cfg.bank())
        groups = plan.groups
        result["coords"] = (groups.dp_rank, groups.tp_rank)
        bank = plan.build_bank(D, B_DEC, len(batches))
        result[kind] = run_bank(bank, batches, groups.dp_rank, groups.layout.dp)
        result[kind]["tokens_seen"] = bank.tokens_seen
    return result


def _resume_runs(world: int, store: str, out_a: str, out_b: str) -> None:
    """Job A trains 10 steps with a checkpoint at step 5; job B resumes from that checkpoint."""
    import torch.distributed as dist

    from distributed_sae.parallel.plan import make_plan
    from distributed_sae.train.trainer import run

    def train_rank(cfg):
        return run(cfg, make_plan(cfg))

    kw = {"store_path": store, "tokens": BATCH * 10, "checkpoint_every": 5}
    train_rank(make_cfg("topk", world, world, out_dir=out_a, **kw))
    if dist.get_rank() == 0:
        shutil.copytree(os.path.join(out_a, "train", "checkpoints"),
                        os.path.join(out_b, "train", "checkpoints"))
    dist.barrier()
    train_rank(make_cfg("topk", world, world, out_dir=out_b, **kw))


def _worker(rank: int, world: int, port: int, tp: int, out_dir: str, store: str | None) -> None:
    torch.set_num_threads(1)
    from distributed_sae.parallel import destroy_group, init_group

    init_group(rank, world, "127.0.0.1", port, backend="gloo")
    try:
        result = _bank_runs(world, tp)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if store is not None:
            _resume_runs(world, store, os.path.join(out_dir, "a"), os.path.join(out_dir, "b"))
    finally:
        destroy_group()


def spawn(out, world: int, tp: int, store: str | None = None) -> list[dict]:
    from distributed_sae.parallel import free_port

    mp.spawn(_worker, args=(world, free_port(), tp, str(out), store), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One spawn of dp 1 x tp 2 (process start-up dominates): the bank runs, then the
    checkpoint/resume jobs on a store. Returns (rank results, output folder)."""
    from conftest import write_sparse_store

    out = tmp_path_factory.mktemp("sharded")
    write_sparse_store(out / "store")
    return spawn(out, world=2, tp=2, store=str(out / "store")), out


def check_against_reference(ranks: list[dict], tp: int) -> None:
    for kind in KINDS:
        ref = reference(kind, tp, global_batches(STEPS))
        if kind == "topk":  # AuxK really runs for the wide member, and not from the start
            dead_at = [int((s[1] >= DEAD).sum()) for s in ref["since_fired_steps"]]
            assert dead_at[0] == 0 and sum(d > 0 for d in dead_at) > len(dead_at) // 2, dead_at
        for res in ranks:
            got, tp_rank = res[kind], res["coords"][1]
            assert got["tokens_seen"] == STEPS * BATCH
            torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=0.0)
            for width, p_got, p_ref, s_got, s_ref in zip(
                    WIDTHS, got["params"], ref["params"], got["since_fired"], ref["since_fired"]):
                start, stop = shard_range(width, tp, tp_rank)
                assert torch.equal(s_got, s_ref[start:stop]), (kind, width)
                for name, t in p_ref.items():
                    axis = latent_axis(name, t, width)
                    want = t if axis is None else t.narrow(axis, start, stop - start)
                    torch.testing.assert_close(p_got[f"local.{name}"], want, rtol=0.0, atol=5e-5,
                                               msg=lambda m, n=name: f"{kind} {width} {n}: {m}")


def test_two_shards_match_one_process(two_ranks):
    ranks, _ = two_ranks
    assert [r["coords"] for r in ranks] == [(0, 0), (0, 1)]
    check_against_reference(ranks, tp=2)


def test_two_replicas_of_two_shards_match_one_process(tmp_path):
    ranks = spawn(tmp_path, world=4, tp=2)
    assert [r["coords"] for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    check_against_reference(ranks, tp=2)


def test_checkpoint_resume_and_global_metrics(two_ranks):
    from distributed_sae.sae import load_sae

    _, out = two_ranks
    a, b = out / "a", out / "b"
    ckpt = a / "train" / "checkpoints" / f"step_{5:09d}"
    assert (ckpt / "topk_w512_k4_s1" / "shard_001_of_002.safetensors").exists()
    for member in ("topk_w96_k4_s0", "topk_w512_k4_s1"):
        sae_a, _ = load_sae(a / "train" / member)
        sae_b, _ = load_sae(b / "train" / member)
        for name, t in sae_a.state_dict().items():
            torch.testing.assert_close(sae_b.state_dict()[name], t, rtol=0.0, atol=5e-5)
    records = [json.loads(line) for line in (a / "train" / "metrics.jsonl").read_text().split("\n")
               if line]
    assert [r["step"] for r in records] == [10, 10]
    for r, width in zip(records, (96, 512)):
        hist = r["density_hist"]  # over every latent of the member, not one shard's
        assert sum(hist["counts"]) + hist["never"] == width
        assert 0.0 <= r["dead_fraction"] <= 1.0 and r["fvu"] < 1.0


def test_ray_train_sharded_on_a_store(ray_local, tmp_path):
    """`train` with train.workers=2, train.latent_shards=2 runs Ray Train; rank 0 saves ordinary
    member folders (gathered from the shards) that evaluate like unsharded ones."""
    from conftest import write_sparse_store

    from distributed_sae.eval import evaluate
    from distributed_sae.train import train

    write_sparse_store(tmp_path / "store")
    cfg = make_cfg("topk", 2, 2, widths=(96, 192), store_path=str(tmp_path / "store"),
                   out_dir=str(tmp_path / "out"), tokens=BATCH * 100, dead_tokens=4096)
    cfg.eval.spliced = cfg.eval.features = cfg.eval.dashboard = False  # no model: synthetic data
    folders = train(cfg)
    assert [f.name for f in folders] == ["topk_w96_k4_s0", "topk_w192_k4_s1"]
    assert all((f / "sae_weights.safetensors").exists() for f in folders)
    for name, m in evaluate(cfg).items():
        assert m["fvu"] < 0.5 and m["training_tokens"] == BATCH * 100, (name, m)
