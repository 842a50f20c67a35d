"""Placement of bank members on workers by cost, and a 3-rank gloo run of a placed bank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from test_train_distributed import BATCH, D, STEPS, assert_close_runs, global_batches, make_cfg

from distributed_sae.parallel.placement import member_cost, place_members
from distributed_sae.sae import expand_bank
from distributed_sae.train.bank_trainer import BankTrainer


def test_a_sweep_is_balanced_by_flops_not_by_count():
    widths = [2304, 4608, 9216, 18432]
    costs = [member_cost(576, w) for w in widths]
    plan = place_members(costs, 4, batch=4096)
    # The widest member (53% of the FLOPs) trains data-parallel over 2 workers; the 9216 one has
    # a worker to itself; the two small ones share the last.
    assert plan.groups == ((3,), (3,), (2,), (0, 1))
    fair = sum(c.flops_per_token for c in costs) / 4
    assert max(plan.loads(costs)) <= 1.07 * fair
    # One member per worker (placement by count) would leave the widest member's worker with
    # 2.1x the fair share: what the cost placement removes.
    assert max(c.flops_per_token for c in costs) / fair > 2.1
    assert plan.members_of(3) == [0, 1] and plan.share(3, 1, 4096) == slice(2048, 4096)


def test_small_cases():
    one = place_members([member_cost(64, 512)], 2, batch=128)
    assert one.groups == ((0, 1),)  # a lone member uses every worker
    equal = place_members([member_cost(64, 512)] * 3, 2, batch=128)
    assert sorted(len(equal.members_of(r)) for r in range(2)) == [1, 2]
    # The batch must split evenly over a group: 3 workers cannot share a batch of 128.
    odd = place_members([member_cost(64, 512)], 3, batch=128)
    assert all(128 % len(g) == 0 for g in odd.groups)


def test_memory_limit_is_named():
    with pytest.raises(ValueError, match=r"GiB.*shard it over latents"):
        place_members([member_cost(4096, 1 << 20)], 4, batch=4096, memory_per_worker=8 << 30)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from distributed_sae.parallel import destroy_group, init_group
    from distributed_sae.parallel.placed import PlacedPlan

    init_group(rank, world, "127.0.0.1", port, backend="gloo")
    try:
        cfg = make_cfg("topk", 2 * BATCH, (96, 96, 768))
        placed = PlacedPlan(cfg, cfg.bank())
        bank = placed.build_bank(D, torch.zeros(D), STEPS)
        plan = placed.placement
        losses = []
        for x in global_batches():
            bank.step(x)  # the global batch: each member slices its share
            losses.append({m.spec.member_id: m.last["loss"] for m in bank.members})
        torch.save({"groups": plan.groups, "losses": losses, "tokens_seen": bank.tokens_seen,
                    "params": {m.spec.member_id: {k: v.clone() for k, v in
                                                  m.sae.state_dict().items()}
                               for m in bank.members}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_group()


def test_three_ranks_train_a_placed_bank_like_one_process(tmp_path):
    from distributed_sae.parallel import free_port

    mp.spawn(_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    cfg = make_cfg("topk", 2 * BATCH, (96, 96, 768))
    specs = expand_bank(cfg.sae, "blocks.0.hook_resid_post")
    ids = [s.member_id for s in specs]
    # 768 latents are 80% of the FLOPs: 2 workers; the two 96-wide members share the third.
    assert ranks[0]["groups"] == ((2,), (2,), (0, 1))
    assert sorted(ranks[2]["params"]) == sorted(ids[:2]) and list(ranks[0]["params"]) == [ids[2]]
    assert all(r["tokens_seen"] == STEPS * BATCH for r in ranks)
    bank = BankTrainer(cfg, specs, D, torch.zeros(D), STEPS)
    ref_losses = []
    for x in global_batches():
        bank.step(x)
        ref_losses.append({m.spec.member_id: m.last["loss"] for m in bank.members})
    for m in bank.members:
        owner = 2 if m.spec.member_id in ids[:2] else 0
        got = {"losses": torch.tensor([s[m.spec.member_id] for s in ranks[owner]["losses"]],
                                      dtype=torch.float64),
               "params": [ranks[owner]["params"][m.spec.member_id]]}
        ref = {"losses": torch.tensor([s[m.spec.member_id] for s in ref_losses],
                                      dtype=torch.float64),
               "params": [m.sae.state_dict()]}
        # Alone on a rank: the same computation as the single process, bit for bit. Over 2 ranks:
        # the tolerance of test_train_distributed (fp32 summation order).
        tol = (0.0, 0.0) if owner == 2 else (1e-5, 5e-5)
        assert_close_runs(got, ref, loss_rtol=tol[0], weight_atol=tol[1])
    # Both ranks of the wide member's group hold the same weights.
    p0, p1 = ranks[0]["params"][ids[2]], ranks[1]["params"][ids[2]]
    assert all(torch.equal(p0[k], p1[k]) for k in p0)


def test_ray_train_worker_death_restarts_from_the_checkpoint(ray_local, tmp_path, monkeypatch):
    """Rank 1 dies hard (os._exit, like a preempted node) at step 23 of 40; Ray Train restarts
    the group, the ranks resume from the step-20 checkpoint (each member saved whole by the rank
    that leads it) and end with the weights of an uninterrupted 2-worker run."""
    from conftest import write_sparse_store
    from safetensors.torch import load_file

    from distributed_sae.train import train

    write_sparse_store(tmp_path / "store")

    def run(name: str):
        cfg = make_cfg("topk", 4096, widths=(96, 192), store_path=str(tmp_path / "store"),
                       out_dir=str(tmp_path / name), tokens=BATCH * 40, checkpoint_every=10)
        cfg.train.workers = 2
        train(cfg)
        return {f.parent.name + k: v for f in sorted((tmp_path / name / "train").glob(
            "*/sae_weights.safetensors")) for k, v in load_file(str(f)).items()}

    clean = run("clean")
    monkeypatch.setenv("DSAE_FAULT_AT_STEP", "23")
    crashed = run("crashed")
    assert (tmp_path / "crashed" / "train" / ".fault_injected").is_file()  # it really died
    steps = sorted(p.name for p in (tmp_path / "crashed" / "train" / "checkpoints").glob("step_*"))
    assert steps == ["step_000000020", "step_000000030"]
    assert clean.keys() == crashed.keys() and len(clean) == 8
    for key in clean:
        assert torch.equal(clean[key], crashed[key]), key
