"""The gated SAE: forward pass and loss against hand-written references, the parameters each loss
term trains, fold_input_scale, SAELens 'gated' files, training on sparse data, its parameters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_sae_kinds import D_IN, D_SAE, fit, fvu_l0, sparse_data

from distributed_sae.config import ConfigError, SAEConfig, TrainConfig
from distributed_sae.sae import ReLUSAE, load_sae, save_sae
from distributed_sae.sae.gated import GatedParams, GatedSAE
from distributed_sae.sae.registry import k_kinds, kinds, sae_class, shardable_kinds
from distributed_sae.sae.relu import ReLUParams

D, M = 16, 40
L1 = 0.3
SAELENS_SHAPES = {"W_enc": (D, M), "b_gate": (M,), "r_mag": (M,), "b_mag": (M,),
                  "W_dec": (M, D), "b_dec": (D,)}


def perturbed(seed: int = 7) -> GatedSAE:
    """Every tensor random, W_enc apart from W_dec^T, so each one's role is tested."""
    sae = GatedSAE(D, M, l1_coefficient=L1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, M, generator=g) / D ** 0.5)
        sae.b_gate.copy_(torch.randn(M, generator=g) * 0.3)
        sae.r_mag.copy_(torch.randn(M, generator=g) * 0.5)
        sae.b_mag.copy_(torch.randn(M, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D, generator=g))
    return sae


def detached(sae: GatedSAE) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in sae.saelens_tensors().items()}


def reference(t: dict[str, torch.Tensor], x: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAELens's GatedSAE.encode and decode written out on its named tensors t, for x
    (batch, d_in): (π_gate, f, x_hat)."""
    sae_in = x - t["b_dec"]
    gate = sae_in @ t["W_enc"] + t["b_gate"]
    mag = sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
    f = (gate > 0).to(x.dtype) * mag.relu()
    return gate, f, f @ t["W_dec"] + t["b_dec"]


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return sparse_data()


# ---- the function and the loss -----------------------------------------------------------------
def test_forward_matches_the_saelens_formula():
    sae = perturbed()
    x = torch.randn(64, D) * 2
    _, f_ref, x_hat_ref = reference(detached(sae), x)
    f = sae.encode(x)
    assert torch.allclose(f, f_ref, atol=1e-5) and torch.allclose(sae(x), x_hat_ref, atol=1e-5)
    gate, mag = sae.gate_and_magnitude(x)
    shut = (gate <= 0) & (mag > 0)  # the gate closes latents the magnitude path would open
    assert shut.any() and (f[shut] == 0).all() and (f > 0).any()


def test_loss_terms_equal_hand_computed_values():
    sae = perturbed()
    with torch.no_grad():
        sae.W_dec[:20] *= 3.0  # the L1 term must see each row's norm
        sae.b_gate[0] = -100.0  # a latent that never fires
    x = torch.randn(64, D) * 2
    out = sae.loss(x, sparsity_scale=0.5)
    t = detached(sae)
    gate, f, x_hat = reference(t, x)
    mse = (x_hat - x).pow(2).mean()
    l1 = (gate.relu() * t["W_dec"].norm(dim=1)).sum(1).mean()
    aux = (gate.relu() @ t["W_dec"] + t["b_dec"] - x).pow(2).mean()
    for name, want in {"mse": mse, "l1": l1, "aux_mse": aux}.items():
        assert torch.allclose(out.terms[name], want, rtol=1e-5), name
    assert torch.allclose(out.loss, mse + 0.5 * L1 * l1 + aux, rtol=1e-5)
    assert torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert torch.equal(out.counts, (f > 0).sum(0)) and torch.equal(out.fired, out.counts > 0)
    assert out.fired[1:].any() and not out.fired[0]


def test_each_loss_term_trains_only_its_parameters():
    sae = perturbed()
    out = sae.loss(torch.randn(64, D) * 2)
    params = sae.saelens_tensors()

    def trained_by(term: str) -> set[str]:
        grads = torch.autograd.grad(out.terms[term], list(params.values()), retain_graph=True,
                                    allow_unused=True)
        return {name for name, g in zip(params, grads) if g is not None and bool(g.abs().sum())}

    # The step 1[π_gate > 0] passes nothing to the gate's own bias.
    assert trained_by("mse") == set(params) - {"b_gate"}
    # The penalty never reaches the magnitudes (no shrinkage); b_dec through x̄ = x - b_dec.
    assert trained_by("l1") == {"W_enc", "b_gate", "W_dec", "b_dec"}
    # Through a frozen decoder: the auxiliary term trains the gate (and the input centring).
    assert trained_by("aux_mse") == {"W_enc", "b_gate", "b_dec"}


def test_rescaling_a_latent_leaves_the_loss_unchanged_so_no_unit_norm_is_needed():
    sae, x = perturbed(), torch.randn(64, D) * 2
    before = sae.loss(x)
    c = torch.rand(M, generator=torch.Generator().manual_seed(3)) * 3 + 0.2  # (d_sae,)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_gate, sae.b_mag):
            p.mul_(c)  # W_enc (d_in, d_sae) scales by column
        sae.W_dec.div_(c[:, None])
    after = sae.loss(x)
    assert torch.allclose(after.loss, before.loss, rtol=1e-4)
    assert not sae.unit_norm_decoder and not sae.uses_resampling and sae.grad_clip is None
    # Shardable: tests/test_latent_shard.py trains it over 2 shards against one process.
    assert GatedSAE.shardable and GatedSAE.default_lr == ReLUSAE.default_lr


def test_fold_input_scale_gives_the_same_function_on_raw_inputs():
    sae = perturbed().eval()
    x = torch.randn(50, D) * 7.0
    scale = 0.3
    f_scaled, out_scaled = sae.encode(x * scale), sae(x * scale) / scale
    assert (f_scaled != 0).any() and (f_scaled == 0).any()
    gate_params = {name: detached(sae)[name] for name in ("b_gate", "r_mag", "b_mag")}
    sae.fold_input_scale(scale)
    assert torch.allclose(sae.encode(x), f_scaled, atol=1e-5)
    assert torch.allclose(sae(x), out_scaled, atol=1e-4)
    # Both paths' pre-activations are unchanged, so their biases and r_mag are too.
    assert all(torch.equal(detached(sae)[name], t) for name, t in gate_params.items())


# ---- SAELens files -----------------------------------------------------------------------------
def test_save_load_round_trip_writes_saelens_gated(tmp_path):
    sae = perturbed().eval()
    save_sae(sae, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and (cfg["d_in"], cfg["d_sae"]) == (D, M)
    assert cfg["metadata"]["dsae_kind"] == "gated"
    assert cfg["metadata"]["dsae_params"] == {"l1_coefficient": L1}
    tensors = load_file(str(tmp_path / "g" / "sae_weights.safetensors"))
    assert {name: tuple(t.shape) for name, t in tensors.items()} == SAELENS_SHAPES
    back, _ = load_sae(tmp_path / "g")
    assert type(back) is GatedSAE and not back.training
    assert back.extra_state() == sae.extra_state()
    x = torch.randn(50, D) * 2
    assert torch.equal(back(x), sae(x))
    # The file alone, read as SAELens reads it, computes the same function.
    assert torch.allclose(reference(tensors, x)[2], sae(x), atol=1e-5)


def test_loads_a_gated_folder_written_without_our_metadata(tmp_path):
    sae = perturbed().eval()
    folder = save_sae(sae, tmp_path / "g")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"] = {"sae_lens_version": "6.5.0"}  # as SAELens writes it: no dsae_kind
    (folder / "cfg.json").write_text(json.dumps(cfg))
    back, _ = load_sae(folder)
    x = torch.randn(20, D)
    assert type(back) is GatedSAE and torch.equal(back(x), sae(x))


# ---- training ----------------------------------------------------------------------------------
def test_learns_sparse_structure_and_l1_sets_the_sparsity(data):
    l0s = []
    for l1 in (0.1, 0.2):
        sae = GatedSAE(D_IN, D_SAE, l1_coefficient=l1)
        before, _ = fvu_l0(sae, data)
        fit(sae, data)
        fvu, l0 = fvu_l0(sae, data)
        assert fvu < 0.3 < before, (l1, before, fvu, l0)
        l0s.append(l0)
    assert 1 <= l0s[1] <= 12 and l0s[1] < 0.6 * l0s[0], l0s


# ---- parameters and construction ---------------------------------------------------------------
def test_params_are_validated_and_read_from_the_run_config():
    with pytest.raises(ConfigError, match=r"gated: l1_coefficient=-0\.1 must be >= 0"):
        GatedParams(l1_coefficient=-0.1)
    with pytest.raises(ConfigError, match="do not apply"):
        GatedParams.build({}, {"k": 8})
    with pytest.raises(ValueError, match="l1_coefficient"):
        GatedSAE(D, M, l1_coefficient=-1.0)
    assert GatedParams.build({"sae.l1_coefficient": 0.2}) == GatedParams(l1_coefficient=0.2)
    sae = GatedSAE.from_config(D, M, SAEConfig(widths=[M], l1_coefficient=0.2), TrainConfig())
    assert sae.extra_state() == {"l1_coefficient": 0.2}


def test_latent_axes_name_every_per_latent_tensor():
    # Checkpoints slice each per-latent tensor along its axis and refuse unnamed ones.
    # A CLT-form member adds its latent_group (d_sae,) to the kind's own tensors.
    from distributed_sae.sae.forms import Form

    sae = GatedSAE(2 * D, M, form=Form("clt", (D, D), (D, D)))
    per_latent = {name for name, t in sae.state_dict().items() if M in t.shape}
    assert set(GatedSAE.latent_axes) == per_latent
    assert all(sae.state_dict()[name].shape[axis] == M
               for name, axis in GatedSAE.latent_axes.items())


def test_from_params_builds_it_through_the_registry():
    assert sae_class("gated") is GatedSAE and "gated" in kinds()
    assert "gated" in shardable_kinds() and "gated" not in k_kinds()
    sae = sae_class("gated").from_params(D, M, GatedParams(l1_coefficient=0.2), seed=3)
    assert type(sae) is GatedSAE and sae.params == GatedParams(l1_coefficient=0.2)
    assert torch.equal(sae.W_dec, GatedSAE(D, M, seed=3).W_dec)  # the seed reaches the init
    with pytest.raises(TypeError, match="GatedParams"):
        GatedSAE.from_params(D, M, ReLUParams())
