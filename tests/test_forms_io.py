"""Member forms on disk and on shards: save -> load round trips for every kind and form,
cfg.json's architecture names and the keys and tensor names SAELens 6.x's transcoder loaders read;
latent-sharded transcoders and CLTs over 2 gloo ranks against the unsharded ones (loss, x_hat,
gradients, updated weights) and fresh CLT shards' layer groups. Shared helpers: forms_common.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from distributed_sae.sae import load_sae, save_sae

from forms_common import (  # the shared sizes and helpers
    CLT_IN, CLT_LAYERS, CLT_OUT, D_IN, D_OUT, FORMS_OF_KIND, N, TRANSCODERS, close, data,
    form_of, make, randomize,
)

# ---- 5. save and load --------------------------------------------------------------------------------
# cfg.json's architecture: SAELens 6.x's transcoder names for standard (relu) and jumprelu
# inference (batchtopk and matryoshka infer as jumprelu), else '<SAELens arch>_<form>'.
SAELENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard",
                "jumprelu": "jumprelu", "matryoshka": "jumprelu", "gated": "gated"}
TRANSCODER_ARCH = {
    ("relu", "transcoder"): "transcoder", ("relu", "skip_transcoder"): "skip_transcoder",
    ("jumprelu", "transcoder"): "jumprelu_transcoder",
    ("jumprelu", "skip_transcoder"): "jumprelu_skip_transcoder",
    ("batchtopk", "transcoder"): "jumprelu_transcoder",
    ("batchtopk", "skip_transcoder"): "jumprelu_skip_transcoder",
    ("matryoshka", "transcoder"): "jumprelu_transcoder",
    ("matryoshka", "skip_transcoder"): "jumprelu_skip_transcoder",
    ("topk", "transcoder"): "topk_transcoder", ("topk", "skip_transcoder"): "topk_skip_transcoder",
    ("gated", "transcoder"): "gated_transcoder",
    ("gated", "skip_transcoder"): "gated_skip_transcoder",
}


def expected_architecture(kind: str, form_name: str) -> str:
    return TRANSCODER_ARCH.get((kind, form_name), f"{SAELENS_ARCH[kind]}_{form_name}")


META = {"model_name": "synthetic", "hook_name": "blocks.0.ln2.hook_normalized",
        "hook_name_out": "blocks.0.hook_mlp_out"}


@pytest.mark.parametrize("kind,form_name", FORMS_OF_KIND)
def test_save_load_round_trip(kind, form_name, tmp_path):
    form = form_of(form_name)
    sae = randomize(make(kind, form)).eval()
    folder = save_sae(sae, tmp_path / "member", metadata=META)
    loaded, cfg = load_sae(folder)
    assert type(loaded) is type(sae) and not loaded.training
    got = loaded.form
    assert (got.name, got.in_dims, got.targets_dims) == (form.name, form.in_dims,
                                                         form.targets_dims)
    assert cfg["architecture"] == expected_architecture(kind, form_name)
    assert (cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (form.d_in, form.d_out, N)
    assert cfg["apply_b_dec_to_input"] is (form_name == "crosscoder")
    assert cfg["metadata"]["hook_name_out"] == META["hook_name_out"]
    if form.groups:
        assert loaded.latent_group.dtype == torch.long
        assert torch.equal(loaded.latent_group, sae.latent_group)
    x, _ = data(form)
    with torch.no_grad():
        assert sae(x).abs().sum() > 0
        close(loaded(x), sae(x), rtol=1e-6, atol=1e-6)
        for name, t in sae.state_dict().items():
            # Exact copies, but JumpReLU stores θ = exp(log θ) and loads its log: 1 ulp.
            tol = 1e-6 if name == "log_threshold" else 0.0
            close(loaded.state_dict()[name].to(t.dtype), t, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("form_name", TRANSCODERS)
@pytest.mark.parametrize("kind", ["relu", "jumprelu"])
def test_saelens_transcoder_files(kind, form_name, tmp_path):
    """What SAELens 6.x's (JumpReLU)(Skip)Transcoder loaders read: cfg.json's architecture,
    d_in, d_out, d_sae, apply_b_dec_to_input false, metadata (hook_name_out passed through), and
    exactly its tensor names and shapes."""
    form = form_of(form_name)
    sae = randomize(make(kind, form))
    folder = save_sae(sae, tmp_path / "tc", metadata=META)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == TRANSCODER_ARCH[(kind, form_name)]
    assert (cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (D_IN, D_OUT, N)
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["hook_name"] == META["hook_name"]
    assert meta["hook_name_out"] == META["hook_name_out"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else SAELens renames old keys
    want = {"W_enc": (D_IN, N), "b_enc": (N,), "W_dec": (N, D_OUT), "b_dec": (D_OUT,)}
    if kind == "jumprelu":
        want["threshold"] = (N,)
    if form.skip:
        want["W_skip"] = (D_OUT, D_IN)
    with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as fh:
        shapes = {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}
        assert shapes == want
        if kind == "jumprelu":  # the raw threshold, not its log
            close(fh.get_tensor("threshold"), sae.threshold.detach())
        if form.skip:
            close(fh.get_tensor("W_skip"), sae.W_skip.detach(), rtol=0, atol=0)


# ---- 6. latent-sharded transcoders ----------------------------------------------------------
SHARD_KINDS = ("topk", "relu", "jumprelu")  # relu is april_2024: its global gradient clip too
SHARDS = 2
# Transcoders of every shard kind, and CLTs of the per-latent ones (their latent_group and block
# masks are sliced with the latents).
SHARD_CASES = [(k, f) for k in SHARD_KINDS for f in TRANSCODERS] + [("relu", "clt"),
                                                                     ("jumprelu", "clt")]


def shard_case(kind: str, form_name: str) -> tuple:
    """(full SAE, x, y, dead (N,) or None) of a sharded scenario; the same on every rank."""
    form = form_of(form_name)
    sae = randomize(make(kind, form, seed=3), seed=4)
    x, y = data(form, seed=5)
    dead = None
    if kind == "topk":  # AuxK over latents of both shards
        dead = torch.zeros(N, dtype=torch.bool)
        dead[5:40] = True
    return sae, x, y, dead


def one_step(model, x, y, dead) -> dict:
    """Loss, backward and one Adam step as bank_trainer.train_step takes them (plain or
    latent-sharded model: both have the methods used here)."""
    from distributed_sae.train.bank_trainer import clip_gradients

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    out = model.loss(x, dead=dead, target=y)
    out.loss.backward()
    params = model.local if hasattr(model, "local") else model
    grads = {n: p.grad.clone() for n, p in params.named_parameters()}
    if model.unit_norm_decoder:
        model.remove_parallel_grad()
    if model.grad_clip is not None:
        clip_gradients(model)
    opt.step()
    if model.unit_norm_decoder:
        model.normalize_decoder()
    with torch.no_grad():
        fwd = model(x)
    return {"loss": out.loss.detach(), "x_hat": out.x_hat.detach(), "forward": fwd,
            "terms": {k: v.detach() for k, v in out.terms.items()}, "grads": grads,
            "state": {k: v.detach().clone() for k, v in params.state_dict().items()}}


def _shard_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from distributed_sae.parallel import destroy_group, init_group
    from distributed_sae.parallel.collectives import ShardComm
    from distributed_sae.parallel.latent_shard import LatentShardedSAE

    init_group(rank, world, "127.0.0.1", port, backend="gloo")
    try:
        comm = ShardComm()  # the default group: both ranks are the member's shards
        res = {}
        for kind, form_name in SHARD_CASES:
            full, x, y, dead = shard_case(kind, form_name)
            model = LatentShardedSAE.from_full(full, comm)
            local_dead = None if dead is None else dead[model.start:model.stop]
            res[(kind, form_name)] = one_step(model, x, y, local_dead)
        # A fresh CLT shard (the engine's builder, never the whole member) holds the whole
        # member's layer groups of its latents, with its forbidden blocks zero.
        from distributed_sae.parallel.sharded_plan import sharded_member_builder
        from distributed_sae.sae.bank import MemberSpec
        from distributed_sae.sae.jumprelu import JumpReLUParams

        ins = tuple(f"blocks.{l}.ln2.hook_normalized" for l in range(CLT_LAYERS))
        outs = tuple(f"blocks.{l}.hook_mlp_out" for l in range(CLT_LAYERS))
        spec = MemberSpec("jumprelu", N, JumpReLUParams(), ins, outs, form="clt")
        shard = sharded_member_builder(comm)(spec, {**{h: CLT_IN for h in ins},
                                                    **{h: CLT_OUT for h in outs}})
        enc, dec = shard.local.clt_masks()
        res["fresh_clt"] = {"groups": shard.local.latent_group.clone(),
                            "forbidden": float(shard.W_enc[~enc].abs().sum()
                                               + shard.W_dec[~dec].abs().sum())}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> list[dict]:
    """Every sharded scenario in one spawn of 2 gloo processes (start-up dominates)."""
    from distributed_sae.parallel import free_port

    out = tmp_path_factory.mktemp("forms_shard")
    mp.spawn(_shard_worker, args=(SHARDS, free_port(), str(out)), nprocs=SHARDS, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(SHARDS)]


def test_fresh_clt_shards_hold_the_members_layer_groups(sharded_runs):
    from distributed_sae.parallel.latent_shard import shard_range

    for r, got in enumerate(s["fresh_clt"] for s in sharded_runs):
        start, stop = shard_range(N, SHARDS, r)
        assert torch.equal(got["groups"], torch.arange(start, stop) % CLT_LAYERS)
        assert got["forbidden"] == 0.0


@pytest.mark.parametrize("kind, form_name", SHARD_CASES)
def test_latent_sharded_transcoder_matches_unsharded(sharded_runs, kind, form_name):
    from distributed_sae.parallel.latent_shard import latent_axis, shard_range, slice_latents

    full, x, y, dead = shard_case(kind, form_name)
    ref = one_step(full, x, y, dead)
    if kind == "topk":
        assert "auxk" in ref["terms"]
    # The runs differ in fp32 summation order only (x_hat sums two shards' partial products).
    for r, got in enumerate(s[(kind, form_name)] for s in sharded_runs):
        start, stop = shard_range(N, SHARDS, r)
        close(got["loss"], ref["loss"], atol=0)
        for name, v in ref["terms"].items():
            close(got["terms"][name], v, atol=0, msg=name)
        close(got["x_hat"], ref["x_hat"], atol=5e-5)
        close(got["forward"], ref["forward"], atol=5e-5)
        for what in ("grads", "state"):  # gradients, and the weights after the step
            for name, t in ref[what].items():
                want = slice_latents(t, latent_axis(name, t, N), start, stop)
                close(got[what][name], want, atol=5e-5, msg=f"{what} {name} (rank {r})")
        if form_name == "skip_transcoder":  # replicated, so identical on both shards
            assert torch.equal(got["state"]["W_skip"], sharded_runs[0][(kind, form_name)]
                               ["state"]["W_skip"])


