"""Latent-sharded SAEs: 2 gloo shards of a member give the unsharded member's run.

One module-scoped spawn of 2 processes (process start-up dominates) runs every sharded scenario
and saves its results; the tests compare them with the unsharded member run here:
* forward, loss terms (MSE, AuxK with a given dead mask) and every gradient of one TopK step;
* 20 Adam steps (unit-norm decoder, dead-latent tracking, AuxK once latents die) for TopK,
  BatchTopK (threshold EMA too), JumpReLU and ReLU (april_2024: norm-weighted L1, global grad
  clipping): per-step losses and final weights;
* a 2-shard checkpoint after 10 TopK steps, loaded into 1 shard here, trained 10 more steps:
  equal to 20 unsharded steps; gather_full of the 2-shard run equals the unsharded SAE;
* bytes sent per step do not depend on the width (64 vs 256 latents);
* ParallelLayout's groups, and its validation errors (no processes needed).

Tolerance as in test_train_distributed.py: the runs differ only in fp32 summation order (x_hat
is summed over two shards' partial products): rtol 1e-5 on losses, atol 5e-5 on weights.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import sparse_batches

from distributed_sae.parallel.collectives import ShardComm
from distributed_sae.parallel.latent_shard import LatentShardedSAE, shard_range, train_step
from distributed_sae.parallel.layout import ParallelLayout
from distributed_sae.sae import sae_class

D, N, K, BATCH, STEPS = 16, 64, 4, 32, 20
DEAD = 2 * BATCH  # latents that did not fire in 2 batches are dead
HPARAMS = {
    "topk": {"k": K}, "batchtopk": {"k": K},
    "jumprelu": {"init_threshold": 0.1, "bandwidth": 0.1, "l0_coefficient": 1e-3},
    "relu": {"l1_coefficient": 0.05, "recipe": "april_2024"}, "gated": {"l1_coefficient": 0.05},
}


def batches(steps: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    """Sums of 3 of 12 unit directions (so many of the 64 latents die), (BATCH, D) per step."""
    return sparse_batches(steps, BATCH, D, 12, seed)


def full_sae(kind: str, n: int = N):
    sae = sae_class(kind)(D, n, **HPARAMS[kind], seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.linspace(-0.1, 0.1, D))  # non-zero: b_dec's gradient matters
    return sae


def run(model, xs: list[torch.Tensor], since_fired: torch.Tensor) -> dict:
    """Adam steps as the bank trainer takes them; since_fired is the model's (local) slice."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return run_with(model, opt, xs, since_fired)


def run_with(model, opt, xs, since_fired) -> dict:
    losses, dead_any = [], []
    for x in xs:
        dead = since_fired >= DEAD
        # Whether any latent of the whole member is dead (a sharded member counts over shards).
        dead_any.append(model.dead_count(dead) > 0 if isinstance(model, LatentShardedSAE)
                        else bool(dead.any()))
        out = train_step(model, opt, x, dead=dead)
        with torch.no_grad():
            since_fired += x.shape[0]
            since_fired[out.fired] = 0
        losses.append(float(out.loss.detach()))
    sd = model.local.state_dict() if isinstance(model, LatentShardedSAE) else model.state_dict()
    return {"losses": torch.tensor(losses, dtype=torch.float64), "dead_any": dead_any,
            "state": {k: v.detach().clone() for k, v in sd.items()},
            "since_fired": since_fired.clone()}


def _one_step(comm: ShardComm) -> dict:
    """Forward, loss and gradients of one TopK step with a given dead mask (AuxK on)."""
    full = full_sae("topk")
    model = LatentShardedSAE.from_full(full, comm)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[5:40] = True  # spans both shards
    x = batches(1, seed=5)[0]
    out = model.loss(x, dead=dead[model.start:model.stop])
    out.loss.backward()
    return {"x_hat": out.x_hat.detach(), "loss": out.loss.detach(),
            "terms": {k: v.detach() for k, v in out.terms.items()},
            "f": model.encode(x).detach(), "fired": out.fired,
            "grads": {n: p.grad.clone() for n, p in model.local.named_parameters()}}


def _bytes_per_step(comm: ShardComm, n: int) -> int:
    model = LatentShardedSAE.from_full(full_sae("topk", n), comm)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    comm.stats.reset()
    train_step(model, opt, batches(1)[0], dead=None)
    return comm.stats.payload_bytes


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from distributed_sae.parallel import destroy_group, init_group
    from distributed_sae.parallel.shard_checkpoint import gather_full, save_sharded

    init_group(rank, world, "127.0.0.1", port, backend="gloo")
    try:
        groups = ParallelLayout(2, 1, 2).build()
        comm = groups.shard_comm()
        res = {"coords": (groups.dp_rank, groups.tp_rank), "one_step": _one_step(comm)}
        dp_groups = ParallelLayout(2, 2, 1).build()
        res["dp_coords"] = (dp_groups.dp_rank, dp_groups.tp_rank, dp_groups.shard_comm().size)
        for kind in HPARAMS:
            model = LatentShardedSAE.from_full(full_sae(kind), comm)
            res[kind] = run(model, batches(), torch.zeros(N // 2, dtype=torch.long))
            if kind == "topk":
                full = gather_full(model)
                res["gathered"] = None if full is None else full.state_dict()
        # A 2-shard checkpoint after half the steps (loaded into 1 shard by the test).
        model = LatentShardedSAE.from_full(full_sae("topk"), comm)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        since = torch.zeros(N // 2, dtype=torch.long)
        run_with(model, opt, batches()[:STEPS // 2], since)
        save_sharded(os.path.join(out_dir, "ckpt"), STEPS // 2, model, opt, since)
        res["bytes"] = {n: _bytes_per_step(comm, n) for n in (64, 256)}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[list[dict], object]:
    from distributed_sae.parallel import free_port

    out = tmp_path_factory.mktemp("latent_shard")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], out


def close(a, b, **kw) -> None:
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-5), atol=kw.get("atol", 5e-5))


def assert_state_slice(shard_state: dict, full_state: dict, shard: int, shards: int = 2) -> None:
    from distributed_sae.parallel.latent_shard import latent_axis, slice_latents

    start, stop = shard_range(N, shards, shard)
    for name, t in full_state.items():
        want = slice_latents(t, latent_axis(name, t, N), start, stop)
        torch.testing.assert_close(shard_state[name], want, rtol=0, atol=5e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_one_step_matches_unsharded(sharded):
    ranks, _ = sharded
    full = full_sae("topk")
    dead = torch.zeros(N, dtype=torch.bool)
    dead[5:40] = True
    x = batches(1, seed=5)[0]
    out = full.loss(x, dead=dead)
    out.loss.backward()
    f = full.encode(x).detach()
    assert "auxk" in out.terms
    for r, res in enumerate(ranks):
        s = res["one_step"]
        start, stop = shard_range(N, 2, r)
        close(s["x_hat"], out.x_hat.detach())
        close(s["loss"], out.loss.detach(), atol=0)
        for name, v in out.terms.items():
            close(s["terms"][name], v.detach(), atol=0)
        close(s["f"], f[:, start:stop])
        assert torch.equal(s["fired"], out.fired[start:stop])
        grads = {n: p.grad for n, p in full.named_parameters()}
        assert_state_slice(s["grads"], grads, r)
    assert ranks[0]["coords"] == (0, 0) and ranks[1]["coords"] == (0, 1)
    assert ranks[1]["dp_coords"] == (1, 0, 1)


@pytest.mark.parametrize("kind", list(HPARAMS))
def test_twenty_adam_steps_match_unsharded(sharded, kind):
    ranks, _ = sharded
    ref = run(full_sae(kind), batches(), torch.zeros(N, dtype=torch.long))
    if kind in ("topk", "batchtopk"):  # AuxK really ran, and not from the start
        assert not ref["dead_any"][0] and sum(ref["dead_any"]) > STEPS // 2, ref["dead_any"]
    for r, res in enumerate(ranks):
        got = res[kind]
        close(got["losses"], ref["losses"], atol=0)
        assert got["dead_any"] == ref["dead_any"]
        assert_state_slice(got["state"], ref["state"], r)
        start, stop = shard_range(N, 2, r)
        assert torch.equal(got["since_fired"], ref["since_fired"][start:stop])
    assert ref["losses"][-1] < ref["losses"][0]


def test_gather_full_and_reshard_2_to_1(sharded, tmp_path):
    from distributed_sae.parallel.shard_checkpoint import load_sharded
    from distributed_sae.sae import load_sae, save_sae

    ranks, out = sharded
    ref_model = full_sae("topk")
    ref = run(ref_model, batches(), torch.zeros(N, dtype=torch.long))
    assert ranks[1]["gathered"] is None
    for name, t in ref["state"].items():
        close(ranks[0]["gathered"][name], t, rtol=0)
    # Resume the 2-shard checkpoint in 1 shard (another process count) and finish the run.
    one = LatentShardedSAE.build("topk", D, N, ShardComm.single(), k=K)
    opt = torch.optim.Adam(one.parameters(), lr=3e-3)
    since = torch.zeros(N, dtype=torch.long)
    state = load_sharded(out / "ckpt" / f"step_{STEPS // 2:09d}", one, opt, since)
    assert state["shards"] == 2 and state["step"] == STEPS // 2
    rest = run_with(one, opt, batches()[STEPS // 2:], since)
    close(rest["losses"], ref["losses"][STEPS // 2:], atol=0)
    for name, t in ref["state"].items():
        close(rest["state"][name], t, rtol=0)
    assert torch.equal(rest["since_fired"], ref["since_fired"])
    # The 1-shard member is an ordinary SAE again once gathered: export round trip.
    from distributed_sae.parallel.shard_checkpoint import gather_full

    loaded, _ = load_sae(save_sae(gather_full(one), tmp_path / "export"))
    close(loaded.W_dec, ref["state"]["W_dec"], rtol=0)


def test_bytes_per_step_do_not_grow_with_width(sharded):
    ranks, _ = sharded
    # TopK candidates 4·BATCH·K, x_hat 4·BATCH·D, b_dec's gradient 4·D (fp32, no dead latents).
    want = 4 * BATCH * K + 4 * BATCH * D + 4 * D
    for res in ranks:
        assert res["bytes"] == {64: want, 256: want}


def test_layout_validation():
    assert ParallelLayout.for_world(8, 2) == ParallelLayout(8, 4, 2)
    lay = ParallelLayout(8, 4, 2)
    assert lay.coords(5) == (2, 1) and lay.tp_ranks(2) == [4, 5] and lay.dp_ranks(1) == [1, 3, 5, 7]
    # Ranks numbered node by node: 4 workers on each of 2 nodes keep every replica whole; 3 + 5
    # split replica 1 (ranks 2, 3) over both.
    assert lay.split_replicas(["a"] * 4 + ["b"] * 4) == {}
    assert lay.split_replicas(["a"] * 3 + ["b"] * 5) == {1: ["a", "b"]}
    with pytest.raises(ValueError, match=r"dp=3 x tp=2 = 6 workers does not match world_size=8"):
        ParallelLayout(8, 3, 2)
    with pytest.raises(ValueError, match=r"tp must divide world_size=8"):
        ParallelLayout(8, 2, 3)
    with pytest.raises(ValueError, match=r"tp=3 must divide world_size=8"):
        ParallelLayout.for_world(8, 3)
    with pytest.raises(ValueError, match=r"dp=0 must be a positive integer"):
        ParallelLayout(8, 0, 2)
    with pytest.raises(ValueError, match=r"width 100 is not divisible by tp=8"):
        ParallelLayout(8, 1, 8).check_width(100)
    with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by dp=4"):
        lay.check_batch(10)
    with pytest.raises(ValueError, match=r"rank=8 is outside"):
        lay.coords(8)
    with pytest.raises(ValueError, match=r"d_sae=10 is not divisible by 4 latent shards"):
        shard_range(10, 4, 0)
    with pytest.raises(ValueError, match=r"cannot be latent-sharded"):
        LatentShardedSAE.from_full(sae_class("matryoshka")(D, N, k=K), ShardComm.single())
