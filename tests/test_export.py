"""The export stage: a round trip for every SAE kind, SAELens's loading rules, the model card.

SAELens itself is not installed here; `saelens_load` / `saelens_forward` below re-implement the
rules of its 6.x loader (required cfg keys, metadata.sae_lens_version >= 6, strict tensor names
and shapes per architecture) and the forward pass it computes, so the exported files are checked
against what SAELens would do with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_sae import SAE
from distributed_sae.config import ExportConfig, RunConfig
from distributed_sae.export import export
from distributed_sae.sae import (BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE,
                                 save_sae)

D_IN, D_SAE, K = 16, 64, 4
HOOK = "blocks.3.hook_resid_post"
REQUIRED_CFG = ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "reshape_activations", "metadata")
SAELENS_TENSORS = {
    "standard": {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"),
                 "b_dec": ("d_in",)},
}
SAELENS_TENSORS["topk"] = SAELENS_TENSORS["standard"]
SAELENS_TENSORS["jumprelu"] = {**SAELENS_TENSORS["standard"], "threshold": ("d_sae",)}


def _kinds() -> dict[str, torch.nn.Module]:
    """One small SAE per kind with every parameter perturbed away from its initial value."""
    saes = {"topk": TopKSAE(D_IN, D_SAE, k=K, seed=1), "relu": ReLUSAE(D_IN, D_SAE, seed=2),
            "jumprelu": JumpReLUSAE(D_IN, D_SAE, init_threshold=0.05, seed=3),
            "batchtopk": BatchTopKSAE(D_IN, D_SAE, k=K, seed=4),
            "matryoshka": MatryoshkaSAE(D_IN, D_SAE, k=K, fractions=[0.25, 1.0], seed=5)}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sae in saes.values():
            for p in sae.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name in ("batchtopk", "matryoshka"):
            saes[name].threshold.fill_(0.3)  # as if trained: θ > 0
    return {name: sae.eval() for name, sae in saes.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A fake run (train/ + eval/ as the stages write them) exported by `export(cfg)`."""
    out = tmp_path_factory.mktemp("run")
    saes = _kinds()
    members = []
    for i, (kind, sae) in enumerate(saes.items()):
        name = f"{kind}_w{D_SAE}_s{i}"
        members.append(name)
        save_sae(sae, out / "train" / name, metadata={
            "model_name": "tiny-model", "hook_name": HOOK, "hook_head_index": None,
            "context_size": 64, "prepend_bos": True, "dataset_path": "cpython",
            "training_tokens": 123_456})
        metrics = {"n_tokens": 2048, "fvu": 0.25, "mse": 0.5, "explained_variance": 0.75,
                   "l0": 4.0, "dead_fraction": 0.0, "dense_fraction": 0.0, "member": name,
                   "hook": HOOK, "d_sae": D_SAE, "log10_density": [-2.0] * D_SAE}
        if kind == "topk":  # the spliced-loss evaluation ran for this member only
            metrics.update(loss_recovered=0.875, kl_div=0.0625, ce_clean=3.0, ce_spliced=3.25, ce_zero=5.0)
        (out / "eval" / name).mkdir(parents=True)
        (out / "eval" / name / "metrics.json").write_text(json.dumps(metrics))
        (out / "eval" / name / "density.png").write_bytes(b"\x89PNG fake density")
    (out / "train" / "bank.json").write_text(json.dumps({"members": members}))
    (out / "eval" / "frontier.png").write_bytes(b"\x89PNG fake frontier")
    cfg = RunConfig(out_dir=str(out), export=ExportConfig(path=str(out / "export")))
    folders = export(cfg)
    return dict(zip(saes, folders)), saes


# ---- a minimal SAELens 6.x loader -------------------------------------------------------------
def saelens_load(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = json.loads((folder / "cfg.json").read_text())
    missing = [k for k in REQUIRED_CFG if k not in cfg]
    assert not missing, f"SAELens needs {missing} in cfg.json"
    version = tuple(int(v) for v in cfg["metadata"]["sae_lens_version"].split(".")[:3])
    assert version >= (6, 0, 0), "older versions make SAELens rename keys (pre-6 format)"
    arch = cfg["architecture"]
    assert arch in SAELENS_TENSORS, f"SAELens has no inference architecture {arch!r}"
    if arch == "topk":
        assert isinstance(cfg["k"], int) and cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    sizes = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"]}
    want = {name: tuple(sizes[d] for d in dims) for name, dims in SAELENS_TENSORS[arch].items()}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == want  # strict: names and shapes
    assert all(str(t.dtype) == f"torch.{cfg['dtype']}" for t in tensors.values())
    return cfg, tensors


def saelens_forward(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor):
    """(features, reconstruction) as SAELens computes them."""
    sae_in = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "standard":
        f = pre.relu()
    elif cfg["architecture"] == "topk":
        top = pre.relu().topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    else:  # jumprelu
        f = pre * (pre > t["threshold"])
    return f, f @ t["W_dec"] + t["b_dec"]


# ---- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu", "batchtopk", "matryoshka"])
def test_round_trip_gives_identical_outputs(exported, kind):
    folders, saes = exported
    loaded = SAE.load(folders[kind])
    assert type(loaded) is type(saes[kind]) and not loaded.training
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(7)) * 2
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), saes[kind].encode(x))
        assert torch.equal(loaded(x), saes[kind](x))
        assert loaded.encode(x).count_nonzero() > 0  # the comparison is not vacuous
    assert loaded.cfg_dict["metadata"]["hook_name"] == HOOK


@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu", "batchtopk", "matryoshka"])
def test_saelens_rules_load_it_and_compute_the_same(exported, kind):
    folders, saes = exported
    cfg, tensors = saelens_load(folders[kind])
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(8)) * 2
    f, x_hat = saelens_forward(cfg, tensors, x)
    with torch.no_grad():
        ours = saes[kind].encode(x)
        assert torch.allclose(f, ours, atol=1e-6) and ours.count_nonzero() > 0
        assert torch.allclose(x_hat, saes[kind].decode(ours), atol=1e-5)
    sparsity = load_file(str(folders[kind] / "sparsity.safetensors"))
    assert set(sparsity) == {"sparsity"} and sparsity["sparsity"].shape == (D_SAE,)


def test_model_card_and_plots(exported):
    folders, _ = exported
    card = (folders["topk"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n")
    for text in ("tiny-model", HOOK, "123456", "fraction of CE loss recovered | 0.875",
                 "KL(clean || spliced) | 0.0625", "FVU (fraction of variance unexplained) | 0.25",
                 "](frontier.png)", "](density.png)", 'SAE.load("path/to/', "SAE.load_from_disk(",
                 'SAE.from_pretrained("<org>/<repo>", "topk_w64_s0")', "k=4"):
        assert text in card, text
    assert (folders["topk"] / "frontier.png").read_bytes() == b"\x89PNG fake frontier"
    assert (folders["relu"] / "density.png").read_bytes() == b"\x89PNG fake density"
    # Loss recovered only where the spliced evaluation ran.
    assert "loss recovered" not in (folders["relu"] / "README.md").read_text()
    metrics = json.loads((folders["relu"] / "metrics.json").read_text())
    assert "log10_density" not in metrics and metrics["fvu"] == 0.25


def test_loading_refuses_files_that_disagree(exported, tmp_path):
    folders, _ = exported
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folders["topk"], bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    (bad / "cfg.json").write_text(json.dumps({**cfg, "d_sae": D_SAE * 2}))
    with pytest.raises(ValueError, match=r"W_enc has shape \(16, 64\) but cfg.json says \(16, 128\)"):
        SAE.load(bad)
    (bad / "cfg.json").write_text(json.dumps({**cfg, "k": K + 1}))
    with pytest.raises(ValueError, match="k=5 but metadata.dsae_params.k=4"):
        SAE.load(bad)
    (bad / "cfg.json").write_text(json.dumps({**cfg, "architecture": "standard"}))
    with pytest.raises(ValueError, match="architecture 'standard' disagrees with kind 'topk'"):
        SAE.load(bad)
    (bad / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="normalize_activations='layer_norm' is not supported"):
        SAE.load(bad)
    (bad / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no sae_weights.safetensors"):
        SAE.load(bad)
    with pytest.raises(TypeError, match="holds a ReLUSAE"):
        TopKSAE.load(folders["relu"])


def test_a_foreign_saelens_folder_loads_by_its_architecture(exported, tmp_path):
    """A SAELens folder written by another tool has no dsae_kind: its architecture decides."""
    folders, saes = exported
    import shutil

    for kind in ("topk", "relu", "jumprelu"):
        shutil.copytree(folders[kind], tmp_path / kind)
        cfg = json.loads((tmp_path / kind / "cfg.json").read_text())
        cfg["metadata"] = {"sae_lens_version": "6.5.0", "hook_name": HOOK}
        (tmp_path / kind / "cfg.json").write_text(json.dumps(cfg))
        x = torch.randn(8, D_IN)
        with torch.no_grad():
            assert torch.equal(SAE.load(tmp_path / kind)(x), saes[kind](x))
