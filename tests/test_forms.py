"""Member forms (sae/forms.py): transcoders, skip-transcoders, crosscoders and CLTs, every kind.

* transcoder / skip_transcoder x every kind: shapes, a finite loss whose gradient reaches every
  weight, the MSE against a decoder (+ skip path) written out by hand, and the encoder not
  subtracting b_dec (SAELens's apply_b_dec_to_input=False);
* a crosscoder over 3 hooks and a CLT over 4 layers against dense references built by hand from
  their weights (per-hook encoder slices; per-layer encoders and a block-triangular decoder), and
  the CLT's forbidden blocks staying exactly 0 through BankTrainer's Adam steps (every kind
  with per-latent codes; a TopK CLT, acausal, is refused);
* least_squares_skip recovers an exact linear map, and a skip-transcoder started from it trains
  to a far lower loss in 20 steps than one started from W_skip = 0;
* fold_input_scale with per-coordinate input and output scales;
* (save and load, latent sharding: tests/test_forms_io.py)
  and tensor names SAELens 6.x's transcoder loaders read;
* a transcoder latent-sharded over 2 gloo ranks gives the unsharded one's loss, x_hat, gradients
  and updated weights;
* the config: unharvested transcoder hooks, sae.forms products and their member ids, refused
  crosscoder products and non-consecutive CLT layers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distributed_sae.config import ConfigError, HarvestConfig, RunConfig, SAEConfig, TrainConfig
from distributed_sae.sae.forms import Form, clt_masks, split_hooks
from distributed_sae.train.bank_trainer import BankTrainer
from distributed_sae.train.norm import MemberInit, least_squares_skip

from forms_common import (  # the shared sizes and helpers
    BATCH, CLT_IN, CLT_KINDS, CLT_LAYERS, CLT_OUT, CROSS_DIMS, D_IN, D_OUT, FORMS_OF_KIND,
    KINDS, N, PARAMS, TRANSCODERS, activate, close, data, dense_decode, form_of, make, randn,
    randomize,
)

# ---- 1. transcoder and skip-transcoder, every kind ---------------------------------------------
@pytest.mark.parametrize("form_name", TRANSCODERS)
@pytest.mark.parametrize("kind", KINDS)
def test_transcoder_loss_matches_dense_reference(kind, form_name):
    form = form_of(form_name)
    sae = randomize(make(kind, form))
    x, y = data(form)
    assert (sae.d_in, sae.d_out) == (D_IN, D_OUT)
    assert sae.W_enc.shape == (D_IN, N) and sae.W_dec.shape == (N, D_OUT)
    assert sae.b_dec.shape == (D_OUT,) and sae.b_enc.shape == (N,)
    assert hasattr(sae, "W_skip") == (form_name == "skip_transcoder")
    if form.skip:
        assert sae.W_skip.shape == (D_OUT, D_IN)  # SAELens's layout
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True  # AuxK on for the k kinds: its residual lives in the target's space

    out = sae.loss(x, dead=dead, target=y)
    assert out.x_hat.shape == (BATCH, D_OUT)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values())
    out.loss.backward()
    for name in ("W_enc", "W_dec", "b_dec") + (("W_skip",) if form.skip else ()):
        grad = getattr(sae, name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"

    with torch.no_grad():
        f = sae.encode(x)  # (BATCH, N), training mode: the loss's own selection
        y_hat = dense_decode(sae, f, x)  # (BATCH, D_OUT)
        close(out.x_hat.detach(), y_hat, msg="x_hat")
        close(out.terms["mse"].detach(), (y_hat - y).pow(2).mean(), msg="mse")
        # The inference forward: the same decoder, skip path included.
        sae.eval()
        close(sae(x), dense_decode(sae, sae.encode(x), x), msg="forward")


@pytest.mark.parametrize("form_name", TRANSCODERS + ("sae",))
@pytest.mark.parametrize("kind", KINDS)
def test_transcoder_encoder_ignores_b_dec(kind, form_name):
    """A transcoder's b_dec lives in the output space: moving it leaves the encoder unchanged
    (and the pre-activations are x W_enc + b_enc). The sae form is the control: there it moves."""
    form = form_of(form_name)
    sae = randomize(make(kind, form))
    x, _ = data(form)
    with torch.no_grad():
        pre, f = sae.pre_acts(x), sae.encode(x)  # (BATCH, N) each
        sae.b_dec.copy_(randn(sae.b_dec.shape, torch.Generator().manual_seed(9), 10.0))
        if form_name == "sae":
            assert not torch.allclose(sae.pre_acts(x), pre)
            return
        assert torch.equal(sae.pre_acts(x), pre)
        assert torch.equal(sae.encode(x), f)
        close(pre, x @ sae.W_enc + sae.b_enc)


# ---- 2. crosscoder and cross-layer transcoder ----------------------------------------------------
@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu"])
def test_crosscoder_matches_dense_reference(kind):
    form = form_of("crosscoder")
    sae = randomize(make(kind, form))
    x, _ = data(form)  # (BATCH, 24): 3 hooks of 8
    assert (sae.d_in, sae.d_out) == (24, 24) and sae.W_dec.shape == (N, 24)
    out = sae.loss(x)  # a crosscoder reconstructs its own inputs: no target needed
    assert out.x_hat.shape == (BATCH, 24)
    with torch.no_grad():
        xs = split_hooks(x, CROSS_DIMS)  # 3 x (BATCH, 8)
        b_in = split_hooks(sae.b_dec, CROSS_DIMS)  # 3 x (8,)
        rows = split_hooks(sae.W_enc.t(), CROSS_DIMS)  # 3 x (N, 8): each hook's encoder slice
        # The hooks' encoder slices sum into one pre-activation; b_dec is subtracted per hook.
        pre = sum((xh - bh) @ wh.t() for xh, bh, wh in zip(xs, b_in, rows)) + sae.b_enc
        f = activate(sae, pre)  # (BATCH, N)
        cols = split_hooks(sae.W_dec, CROSS_DIMS)  # 3 x (N, 8): each hook's decoder slice
        x_hat = [f @ wh + bh for wh, bh in zip(cols, b_in)]  # 3 x (BATCH, 8)
        close(out.x_hat.detach(), torch.cat(x_hat, 1))
        # The MSE of the concatenation: the mean of the hooks' MSEs (equal widths here).
        per_hook = torch.stack([F.mse_loss(h, xh) for h, xh in zip(x_hat, xs)])
        close(out.terms["mse"].detach(), per_hook.mean())


def clt_reference(sae, x: torch.Tensor) -> torch.Tensor:
    """A CLT written as separate per-layer encoders and a block-triangular decoder:
    y_j = sum over layers g <= j of f_g W_dec[g latents, block j] + b_dec_j; (batch, d_out)."""
    xs = split_hooks(x, (CLT_IN,) * CLT_LAYERS)  # layers x (batch, 8)
    groups = sae.latent_group  # (N,)
    pre = torch.zeros(x.shape[0], N, dtype=x.dtype)
    for g in range(CLT_LAYERS):
        idx = (groups == g).nonzero().squeeze(1)  # layer g's latents
        w_g = sae.W_enc[g * CLT_IN:(g + 1) * CLT_IN, idx]  # (8, n_g): reads layer g only
        pre[:, idx] = xs[g] @ w_g + sae.b_enc[idx]  # no b_dec: it is in the output space
    f = activate(sae, pre)  # per latent: layer g's codes read layer g's input only
    ys = []
    for j in range(CLT_LAYERS):
        cols = slice(j * CLT_OUT, (j + 1) * CLT_OUT)
        y_j = sae.b_dec[cols].expand(x.shape[0], CLT_OUT)
        for g in range(j + 1):  # latents of layers g <= j write to layer j's output
            idx = groups == g
            y_j = y_j + f[:, idx] @ sae.W_dec[idx][:, cols]
        ys.append(y_j)
    return torch.cat(ys, 1)


@pytest.mark.parametrize("kind", ["relu", "jumprelu"])
def test_clt_matches_per_layer_reference(kind):
    form = form_of("clt")
    sae = randomize(make(kind, form))
    x, y = data(form)  # (BATCH, 32), (BATCH, 24)
    assert (sae.d_in, sae.d_out) == (32, 24)
    assert torch.equal(sae.latent_group, torch.arange(N) % CLT_LAYERS)
    out = sae.loss(x, target=y)
    assert out.x_hat.shape == (BATCH, 24) and torch.isfinite(out.loss)
    with torch.no_grad():
        y_hat = clt_reference(sae, x)
        close(out.x_hat.detach(), y_hat)
        close(out.terms["mse"].detach(), (y_hat - y).pow(2).mean())
        sae.eval()
        close(sae(x), clt_reference(sae, x))


CLT_HOOKS = [f"blocks.{layer}.{kind}" for layer in range(CLT_LAYERS)
             for kind in ("ln2.hook_normalized", "hook_mlp_out")]


def bank_cfg(members: list[dict], hooks: list[str], lr: float = 3e-3, **train_kw) -> RunConfig:
    """A RunConfig of explicit members over `hooks` (all harvested), for BankTrainer."""
    return RunConfig(harvest=HarvestConfig(hooks=hooks),
                     sae=SAEConfig(widths=[N], k=4, members=members),
                     train=TrainConfig(batch_size=BATCH, lr=lr, warmup_steps=1,
                                       resample_steps=[], **{"optimizer": "adam", **train_kw}))


def clt_batches(steps: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """{hook: (BATCH, width)}: MLP inputs, and outputs that depend on this and earlier layers."""
    g = torch.Generator().manual_seed(seed)
    mix = [randn((CLT_IN, CLT_OUT), g, 0.3) for _ in range(CLT_LAYERS)]
    out = []
    for _ in range(steps):
        xs = [randn((BATCH, CLT_IN), g) for _ in range(CLT_LAYERS)]
        batch = {}
        for j in range(CLT_LAYERS):
            batch[f"blocks.{j}.ln2.hook_normalized"] = xs[j]
            batch[f"blocks.{j}.hook_mlp_out"] = sum(xs[i].relu() @ mix[i] for i in range(j + 1))
        out.append(batch)
    return out


@pytest.mark.parametrize("kind", CLT_KINDS)
def test_clt_masks_survive_training(kind):
    """After Adam steps through BankTrainer (unit-norm decoder, AuxK on dead latents, gradient
    clipping, per kind) every forbidden block is still exactly 0, Adam's moments there too, and
    every allowed block is nonzero and has moved."""
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in PARAMS[kind].items()}
    member = {"form": "clt", "layers": list(range(CLT_LAYERS)), "kind": kind, "width": N, **params}
    cfg = bank_cfg([member], CLT_HOOKS, dead_tokens=BATCH)  # latents die after one silent batch
    specs = cfg.bank()
    dims = {h: CLT_IN if "ln2" in h else CLT_OUT for h in CLT_HOOKS}
    means = {h: torch.full((dims[h],), 0.1) for h in CLT_HOOKS}
    batches = clt_batches(8)
    bank = BankTrainer(cfg, specs, dims, means, total_steps=len(batches))
    m = bank.members[0]
    sae = m.sae
    enc_ok, dec_ok = sae.clt_masks()  # (32, N), (N, 24) allowed entries
    w_enc0, w_dec0 = sae.W_enc.detach().clone(), sae.W_dec.detach().clone()
    for batch in batches:
        bank.step(batch)
    assert torch.isfinite(torch.tensor(m.last["loss"]))
    for name, w, w0, ok in (("W_enc", sae.W_enc, w_enc0, enc_ok), ("W_dec", sae.W_dec, w_dec0,
                                                                   dec_ok)):
        w = w.detach()
        assert torch.count_nonzero(w[~ok]) == 0, f"{name}: a forbidden block moved off 0"
        state = m.opt.state[getattr(sae, name)]
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[moment][~ok]) == 0, f"{name} {moment}"
        assert torch.all(w[ok] != 0), f"{name}: an allowed entry is 0"
    # Every allowed block (latent group g x input block g; x output blocks j >= g) trained.
    groups = sae.latent_group
    for g in range(CLT_LAYERS):
        lat = groups == g
        rows = slice(g * CLT_IN, (g + 1) * CLT_IN)
        assert not torch.equal(sae.W_enc.detach()[rows][:, lat], w_enc0[rows][:, lat]), g
        for j in range(g, CLT_LAYERS):
            cols = slice(j * CLT_OUT, (j + 1) * CLT_OUT)
            assert not torch.equal(sae.W_dec.detach()[lat][:, cols], w_dec0[lat][:, cols]), (g, j)


# ---- 3. the least-squares skip path ---------------------------------------------------------------
def test_least_squares_skip_recovers_linear_map():
    g = torch.Generator().manual_seed(4)
    x = randn((512, D_IN), g) * 3 + 1  # (512, 16), off-centre: the intercept must be fitted
    a, c = randn((D_OUT, D_IN), g), randn((D_OUT,), g)
    w, b = least_squares_skip(x, x @ a.t() + c)
    assert w.shape == (D_OUT, D_IN) and b.shape == (D_OUT,)
    close(w, a, atol=1e-4)
    close(b, c, atol=1e-4)


SKIP_IN, SKIP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def skip_data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x A^T + sparse features of x: (rows, 16), (rows, 12). A and the features are fixed
    (seed 5); `seed` draws the rows. The linear part carries most of y's variance (~7 of ~7.4
    per coordinate), well above the ~1.3 that a fresh TopK decoder's 4 random latents add."""
    g = torch.Generator().manual_seed(5)
    a = randn((D_OUT, D_IN), g, 3 / math.sqrt(D_IN))
    dirs = F.normalize(randn((32, D_IN), g), dim=1)  # (32, 16) feature detectors
    out = F.normalize(randn((32, D_OUT), g), dim=1)  # (32, 12) their output directions
    x = randn((rows, D_IN), torch.Generator().manual_seed(seed))
    feats = (x @ dirs.t() - 1.5).relu()  # (rows, 32), ~7% of entries active
    return x, x @ a.t() + 2 * feats @ out


def test_lstsq_skip_init_beats_zero_init():
    member = {"form": "skip_transcoder", "layer": 0, "kind": "topk", "width": N, "k": 4}
    cfg = bank_cfg([member], [SKIP_IN, SKIP_OUT], lr=1e-3)
    specs = cfg.bank()
    assert (specs[0].inputs, specs[0].targets) == ((SKIP_IN,), (SKIP_OUT,))
    x_fit, y_fit = skip_data(4096, seed=10)
    w, b = least_squares_skip(x_fit, y_fit)
    means = {SKIP_IN: x_fit.mean(0), SKIP_OUT: y_fit.mean(0)}
    inits = {"lstsq": MemberInit(means, {(specs[0].inputs, specs[0].targets): (w, b)}),
             "zeros": MemberInit(means, {})}
    steps = 20
    batches = [skip_data(BATCH, seed=100 + i) for i in range(steps)]
    x_eval, y_eval = skip_data(1024, seed=99)
    mse = {}
    for name, init in inits.items():
        bank = BankTrainer(cfg, specs, {SKIP_IN: D_IN, SKIP_OUT: D_OUT}, init, steps)
        sae = bank.members[0].sae
        if name == "lstsq":  # the trainer's start is the least-squares map and its intercept
            assert torch.equal(sae.W_skip.detach(), w) and torch.equal(sae.b_dec.detach(), b)
        else:
            assert not sae.W_skip.detach().any()
            assert torch.equal(sae.b_dec.detach(), means[SKIP_OUT])
        for xb, yb in batches:
            bank.step({SKIP_IN: xb, SKIP_OUT: yb})
        with torch.no_grad():
            mse[name] = float(sae.loss(x_eval, target=y_eval).terms["mse"])
    # Zeros has to learn the linear map through 4 of 64 latents in 20 small steps; lstsq only
    # the sparse residual. Not marginal: measured 1.25 vs 7.55 (6x); require 3x.
    assert mse["lstsq"] * 3 < mse["zeros"], mse


# ---- 4. folding the input scale ------------------------------------------------------------------
@pytest.mark.parametrize("kind,form_name", FORMS_OF_KIND)
def test_fold_input_scale_per_coordinate(kind, form_name):
    """An SAE trained on x s_in (targets y s_out) folded: folded(x) == sae(x s_in) / s_out."""
    form = form_of(form_name)
    trained = randomize(make(kind, form, dtype=torch.float64))  # fp64: no threshold flips
    g = torch.Generator().manual_seed(6)
    s_in = 0.5 + torch.rand(form.d_in, generator=g, dtype=torch.float64)  # (d_in,)
    # A crosscoder's target is its input: one scale for both (out_scale None).
    s_out = None if form_name == "crosscoder" else \
        0.5 + torch.rand(form.d_out, generator=g, dtype=torch.float64)  # (d_out,)
    folded = make(kind, form, dtype=torch.float64)
    folded.load_state_dict(trained.state_dict())
    folded.fold_input_scale(s_in, s_out)
    trained.eval(), folded.eval()
    x = randn((BATCH, form.d_in), g, dtype=torch.float64)
    with torch.no_grad():
        want = trained(x * s_in) / (s_in if s_out is None else s_out)
        assert want.abs().sum() > 0
        close(folded(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form_name", TRANSCODERS)
def test_fold_input_scale_scalars(form_name):
    form = form_of(form_name)
    trained = randomize(make("relu", form, dtype=torch.float64))
    folded = make("relu", form, dtype=torch.float64)
    folded.load_state_dict(trained.state_dict())
    folded.fold_input_scale(2.5, 0.4)
    x = randn((BATCH, D_IN), torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        close(folded(x), trained(x * 2.5) / 0.4, rtol=1e-10, atol=1e-10)


# ---- 7. the config ---------------------------------------------------------------------------------
def test_unharvested_transcoder_hook_is_refused():
    with pytest.raises(ConfigError) as err:
        RunConfig(harvest=HarvestConfig(hooks=["blocks.2.hook_mlp_out"]),
                  sae=SAEConfig(widths=[N], k=4, members=[
                      {"form": "transcoder", "layer": 2, "kind": "topk", "width": N}]))
    msg = str(err.value)
    assert "blocks.2.ln2.hook_normalized" in msg and "harvest.hooks" in msg


def test_forms_product_members():
    hooks = ["blocks.2.hook_mlp_out", "blocks.2.ln2.hook_normalized"]
    cfg = RunConfig(harvest=HarvestConfig(hooks=hooks),
                    sae=SAEConfig(forms=["sae", "transcoder", "skip_transcoder"],
                                  hooks=["blocks.2.hook_mlp_out"], widths=[64, 128], k=4))
    specs = cfg.bank()
    assert len(specs) == 3 * 2
    ids = [s.member_id for s in specs]
    assert len(set(ids)) == len(ids)
    by_form = {f: [s for s in specs if s.form == f] for f in ("sae", "transcoder",
                                                              "skip_transcoder")}
    assert all(len(v) == 2 for v in by_form.values())
    for s in by_form["sae"]:
        assert s.inputs == ("blocks.2.hook_mlp_out",) and s.outputs == s.inputs
    for s in by_form["transcoder"] + by_form["skip_transcoder"]:
        assert s.inputs == ("blocks.2.ln2.hook_normalized",)
        assert s.targets == ("blocks.2.hook_mlp_out",)
        assert s.form in s.member_id  # readable: the id says which form it is
    # Readable ids: the hook, the form (none for a plain SAE), kind, width, k and seed.
    assert set(ids) == {
        "l2_mlp_out.topk_w64_k4_s0", "l2_mlp_out.topk_w128_k4_s1",
        "l2_ln2_normalized.transcoder_topk_w64_k4_s0",
        "l2_ln2_normalized.transcoder_topk_w128_k4_s1",
        "l2_ln2_normalized.skip_transcoder_topk_w64_k4_s0",
        "l2_ln2_normalized.skip_transcoder_topk_w128_k4_s1"}, ids
    assert set(cfg.bank_hooks) == set(hooks)


def test_crosscoder_in_forms_points_to_members():
    with pytest.raises(ConfigError, match="sae.members"):
        SAEConfig(forms=["crosscoder"])


def test_clt_with_non_consecutive_layers_is_refused():
    member = {"form": "clt", "layers": [0, 2, 3], "kind": "batchtopk", "width": N}
    with pytest.raises(ConfigError, match="consecutive"):
        RunConfig(harvest=HarvestConfig(hooks=CLT_HOOKS),
                  sae=SAEConfig(widths=[N], k=4, members=[member]))


def test_topk_clt_is_refused():
    """TopK picks a token's codes over every layer's latents (acausal for a CLT): refused by the
    class and, naming the member, by the config."""
    assert "topk" not in CLT_KINDS and "relu" in CLT_KINDS
    with pytest.raises(ValueError, match="acausal"):
        make("topk", form_of("clt"))
    member = {"form": "clt", "layers": list(range(CLT_LAYERS)), "kind": "topk", "width": N}
    with pytest.raises(ConfigError, match=r"sae\.members\[0\].*acausal"):
        bank_cfg([member], CLT_HOOKS)


def test_clt_member_builds_the_clt_form():
    """The config's clt entry gives a CLT over the layers' MLP inputs and outputs, whose masks
    are block diagonal (encoder) and block upper triangular (decoder)."""
    member = {"form": "clt", "layers": list(range(CLT_LAYERS)), "kind": "batchtopk", "width": N}
    spec = bank_cfg([member], CLT_HOOKS).bank()[0]
    assert spec.inputs == tuple(f"blocks.{i}.ln2.hook_normalized" for i in range(CLT_LAYERS))
    assert spec.targets == tuple(f"blocks.{i}.hook_mlp_out" for i in range(CLT_LAYERS))
    from distributed_sae.sae import build_sae

    sae = build_sae(spec, {h: CLT_IN if "ln2" in h else CLT_OUT for h in CLT_HOOKS})
    assert sae.form == Form("clt", (CLT_IN,) * CLT_LAYERS, (CLT_OUT,) * CLT_LAYERS)
    enc, dec = clt_masks(sae.form, sae.latent_group)
    for i in range(N):
        g = i % CLT_LAYERS
        assert enc[:, i].nonzero().squeeze(1).tolist() == list(range(g * CLT_IN,
                                                                      (g + 1) * CLT_IN))
        assert dec[i].nonzero().squeeze(1).tolist() == list(range(g * CLT_OUT,
                                                                  CLT_LAYERS * CLT_OUT))


def test_crosscoder_over_hooks_of_different_widths() -> None:
    # The hooks are concatenated, so no kind needs equal widths (e.g. a residual stream of 8 and
    # MLP neurons of 20): per-hook slices of the decoder rows have each hook's own width.
    torch.manual_seed(0)
    from distributed_sae.sae import TopKSAE

    sae = TopKSAE(28, 32, k=4, form=Form("crosscoder", (8, 20)))
    x = torch.randn(16, 28)
    out = sae.loss(x)
    assert out.x_hat.shape == (16, 28) and torch.isfinite(out.loss)
    out.loss.backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad[:, 8:].abs().sum() > 0


def test_placement_cost_counts_every_hook_of_a_member() -> None:
    # A crosscoder over 3 hooks reads and writes 3 x d: 3x an SAE's FLOPs and ~3x its state; a
    # skip-transcoder adds its d x d map to both.
    from distributed_sae.parallel.placed import spec_cost
    from distributed_sae.parallel.placement import member_cost
    from distributed_sae.sae.bank import MemberSpec
    from distributed_sae.sae.topk import TopKParams

    hooks = tuple(f"blocks.{l}.hook_resid_post" for l in range(3))
    dims = {h: 576 for h in hooks} | {"blocks.3.ln2.hook_normalized": 576,
                                      "blocks.3.hook_mlp_out": 576}
    sae = spec_cost(MemberSpec("topk", 4608, TopKParams(), hooks[:1]), dims)
    xc = spec_cost(MemberSpec("topk", 4608, TopKParams(), hooks), dims)
    assert sae == member_cost(576, 4608)
    assert xc.flops_per_token == pytest.approx(3 * sae.flops_per_token)
    assert 2.9 * sae.state_bytes < xc.state_bytes < 3.1 * sae.state_bytes
    skip = spec_cost(MemberSpec("topk", 4608, TopKParams(), ("blocks.3.ln2.hook_normalized",),
                                ("blocks.3.hook_mlp_out",), form="skip_transcoder"), dims)
    assert skip.flops_per_token == pytest.approx(sae.flops_per_token + 6 * 576 * 576)
    assert skip.state_bytes > sae.state_bytes


@pytest.mark.parametrize("entry, words", [
    ({"form": "sae", "hook": "blocks.0.hook_resid_post", "targets": ["blocks.0.hook_mlp_out"]},
     "an sae reads one hook and reconstructs it"),
    ({"form": "crosscoder", "inputs": ["blocks.0.hook_resid_post"]},
     "a crosscoder reads two or more hooks"),
    ({"form": "transcoder", "inputs": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
      "targets": ["blocks.0.hook_mlp_out"]}, "a transcoder reads one hook and writes one other"),
    ({"form": "clt", "inputs": ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"],
      "targets": ["blocks.0.hook_mlp_out"]}, "a clt reads one MLP input per layer"),
])
def test_a_member_whose_hooks_do_not_fit_its_form_is_refused(entry, words):
    # Refused when the config is built (exit code 2 through the CLI), not when training starts.
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out",
             "blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
    kind = "jumprelu" if entry["form"] == "clt" else "topk"
    with pytest.raises(ConfigError) as err:
        RunConfig(harvest=HarvestConfig(hooks=hooks), sae=SAEConfig(
            widths=[N], k=4, members=[{"kind": kind, "width": N, **entry}]))
    message = str(err.value)
    assert message.startswith("sae.members[0]") and words in message and "\n" not in message
