"""The one training engine: banks over hooks, kinds and parameters; every strategy of the plan.

* A member trained inside a bank of 12 (two hooks x three kinds x two widths, plus a k sweep) is
  bit-identical to the same member trained alone: same seed, same batches (the aligned
  BankReader serves each hook's rows once per batch; members never touch each other's state).
* A two-hook bank trains, evaluates and exports every member, each with its own hook.
* Resume across layouts, through the one checkpoint format: a one-process checkpoint continues
  under 2 latent shards, a 2-shard one and a placed one continue in one process; all end within
  the fp32-summation-order tolerance of tests/test_train_distributed.py (atol 5e-5) of the
  uninterrupted run. Under the same layout (2 shards; placed over 2 workers; dp 2 x tp 2 on 4
  ranks) a resumed job is bit-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SECOND_HOOK, write_sparse_store
from safetensors.torch import load_file

from distributed_sae.config import (
    ConfigError, DataConfig, EvalConfig, HarvestConfig, RunConfig, SAEConfig, StoreConfig,
    TrainConfig,
)

HOOK = "blocks.0.hook_resid_post"
BATCH, STEPS, CKPT = 128, 10, 5


def make_cfg(store: str, out: str | Path, hooks=(HOOK,), kinds=("topk",), widths=(64, 96),
             k=4, members=(), workers: int = 1, shards: int = 1, **train_kw) -> RunConfig:
    return RunConfig(
        harvest=HarvestConfig(hooks=[HOOK, SECOND_HOOK], contexts_per_unit=8),
        store=StoreConfig(path=store, chunk_tokens=128),
        data=DataConfig(context_size=64),
        sae=SAEConfig(kinds=list(kinds), widths=list(widths), k=k, hooks=list(hooks),
                      l1_coefficient=0.03, members=list(members)),
        train=TrainConfig(batch_size=BATCH, lr=3e-3, holdout_fraction=0.25, dead_tokens=512,
                          log_every=5, workers=workers, latent_shards=shards, **train_kw),
        eval=EvalConfig(spliced=False, features=False, dashboard=False),  # synthetic: no model
        out_dir=str(out))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("two_hooks") / "store"
    write_sparse_store(path, second_hook=24)
    return str(path)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def test_a_member_inside_a_large_bank_is_bit_identical_to_it_alone(store, tmp_path):
    from distributed_sae.train import train

    big = make_cfg(store, tmp_path / "bank", hooks=(HOOK, SECOND_HOOK),
                   kinds=("topk", "batchtopk", "relu"), k=[4, 8], tokens=BATCH * 30)
    ids = [s.member_id for s in big.bank()]
    assert len(ids) == 2 * (2 * 2 + 2 * 2 + 2)  # hooks x (topk, batchtopk: widths x k; relu)
    assert "l1_resid_post.batchtopk_w96_k8_s1" in ids
    train(big)
    alone = make_cfg(store, tmp_path / "alone", hooks=(SECOND_HOOK,), tokens=BATCH * 30,
                     members=[{"kind": "batchtopk", "width": 96, "k": 8, "seed": 1}])
    assert [s.member_id for s in alone.bank()] == ["batchtopk_w96_k8_s1"]
    train(alone)
    got = weights(tmp_path / "bank" / "train" / "l1_resid_post.batchtopk_w96_k8_s1")
    want = weights(tmp_path / "alone" / "train" / "batchtopk_w96_k8_s1")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_two_hook_bank_trains_evaluates_and_exports_every_member(store, tmp_path):
    from distributed_sae.eval import evaluate
    from distributed_sae.export import export
    from distributed_sae.sae import load_sae
    from distributed_sae.train import train

    cfg = make_cfg(store, tmp_path, hooks=(HOOK, SECOND_HOOK), kinds=("topk", "relu"),
                   widths=(48,), tokens=BATCH * 100)
    folders = train(cfg)
    assert [f.name for f in folders] == [
        "l0_resid_post.topk_w48_k4_s0", "l0_resid_post.relu_w48_s0",
        "l1_resid_post.topk_w48_k4_s0", "l1_resid_post.relu_w48_s0"]
    for f in folders:
        sae, sae_cfg = load_sae(f)
        hook = sae_cfg["metadata"]["hook_name"]
        assert hook == (HOOK if f.name.startswith("l0") else SECOND_HOOK)
        assert sae.d_in == (32 if hook == HOOK else 24)
    results = evaluate(cfg)
    assert sorted(results) == sorted(f.name for f in folders)
    for name, m in results.items():
        assert m["hook"] == (HOOK if name.startswith("l0") else SECOND_HOOK)
        assert m["fvu"] < 0.6, (name, m["fvu"])
    cfg.export.path = str(tmp_path / "export")
    exported = export(cfg)
    assert len(exported) == len(folders)


def test_bank_grammar_errors_name_the_value(store, tmp_path):
    with pytest.raises(ConfigError, match=r"sae.k=\[4, 4\] must be a non-empty list"):
        make_cfg(store, tmp_path, k=[4, 4])
    with pytest.raises(ConfigError, match="sae.kinds='nope' is not one of"):
        make_cfg(store, tmp_path, kinds=("topk", "nope"))
    with pytest.raises(ConfigError, match=r"sae.members\[0\] has no k and sae.k=\[4, 8\]"):
        make_cfg(store, tmp_path, k=[4, 8], members=[{"kind": "topk", "width": 64}])
    with pytest.raises(ConfigError, match="both named 'topk_w64_k4_s0'"):
        make_cfg(store, tmp_path, members=[{"width": 64, "seed": 0}, {"width": 64, "seed": 0}])
    with pytest.raises(ConfigError, match="relu: parameter.*'k'.*do not apply"):
        make_cfg(store, tmp_path, members=[{"kind": "relu", "width": 64, "k": 3}])


# ---- resume across layouts ---------------------------------------------------------------------
def _run(cfg: RunConfig) -> None:
    from distributed_sae.parallel.plan import make_plan
    from distributed_sae.train.trainer import run

    run(cfg, make_plan(cfg))


def _resume_copy(src: Path, dst: Path) -> None:
    """dst's job starts from src's checkpoint at step CKPT (as if src had died after it)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "train" / "checkpoints", dst / "train" / "checkpoints")


def _worker(rank: int, world: int, port: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from distributed_sae.parallel import destroy_group, init_group

    init_group(rank, world, "127.0.0.1", port, backend="gloo")
    out_p, kw = Path(out), {"tokens": BATCH * STEPS, "checkpoint_every": CKPT}
    try:
        # (job, its layout, the job whose checkpoint at step CKPT it resumes from, if any)
        signum = dict(shards=world, optimizer="signum_sf")  # z sliced by latents, its averages
        jobs = [("sharded", dict(shards=world), None), ("sharded_resumed", dict(shards=world),
                                                        "sharded"),
                ("resumed_single", dict(shards=world), "single"), ("placed", {}, None),
                ("placed_resumed", {}, "placed"), ("signum", signum, None),
                ("signum_resumed", signum, "signum")] if world == 2 else [
            ("dp2tp2", dict(shards=2), None), ("dp2tp2_resumed", dict(shards=2), "dp2tp2")]
        for name, layout, source in jobs:
            if rank == 0 and source is not None:
                _resume_copy(out_p / source, out_p / name)
            dist.barrier()
            _run(make_cfg(store, out_p / name, workers=world, **layout, **kw))
    finally:
        destroy_group()


def _spawn(world: int, store: str, out: Path) -> None:
    from distributed_sae.parallel import free_port

    mp.spawn(_worker, args=(world, free_port(), store, str(out)), nprocs=world, join=True)


def _close(a: Path, b: Path, exact: bool = False) -> None:
    for member in ("topk_w64_k4_s0", "topk_w96_k4_s1"):
        wa, wb = weights(a / "train" / member), weights(b / "train" / member)
        for name in wa:
            if exact:
                assert torch.equal(wa[name], wb[name]), (member, name)
            else:
                torch.testing.assert_close(wb[name], wa[name], rtol=0.0, atol=5e-5)


def test_checkpoints_resume_across_layouts(store, tmp_path):
    """single -> 2 shards, 2 shards -> single, placed (2 workers) -> single; and, exactly, 2
    shards -> 2 shards (with Adam and with schedule-free Signum) and placed -> placed."""
    kw = {"tokens": BATCH * STEPS, "checkpoint_every": CKPT}
    _run(make_cfg(store, tmp_path / "single", **kw))
    _spawn(2, store, tmp_path)
    _close(tmp_path / "single", tmp_path / "resumed_single")  # one process -> 2 shards
    _close(tmp_path / "single", tmp_path / "placed")  # placed whole: the same run
    for same in ("sharded", "placed", "signum"):  # killed after step CKPT, resumed alike
        _close(tmp_path / same, tmp_path / f"{same}_resumed", exact=True)
    for src in ("sharded", "placed"):
        _resume_copy(tmp_path / src, tmp_path / f"{src}_in_one")
        _run(make_cfg(store, tmp_path / f"{src}_in_one", **kw))
        _close(tmp_path / src, tmp_path / f"{src}_in_one")
    # A job reading the store as another number of shares cannot take the data position over.
    from distributed_sae.parallel.plan import check_resumable

    path = tmp_path / "single" / "train" / "checkpoints" / f"step_{CKPT:09d}"
    state = json.loads((path / "state.json").read_text())
    with pytest.raises(ValueError, match=r"reading the store as 1 share.*this one reads 2"):
        check_resumable(path, state, state["members"], {"plan": "replicate", "read_world": 2})


def test_a_killed_2x2_job_resumes_bit_identically(store, tmp_path):
    _spawn(4, store, tmp_path)
    _close(tmp_path / "dp2tp2", tmp_path / "dp2tp2_resumed", exact=True)
