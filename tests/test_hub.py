"""SAE.load from folders, bank folders and the Hugging Face Hub cache; pushing to the Hub.

All offline. The Hub repo is a hand-built Hub cache (models--org--name/snapshots/<sha>/... and
refs/<branch>) read with HF_HUB_OFFLINE=1 in a fresh interpreter whose HF_HOME points at it, as a
user would set them. The push runs huggingface_hub's real HfApi with its three network methods
replaced by recorders: the Hub's servers cannot be reached here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_sae
from distributed_sae.export.hub import push_to_hub, resolve_sae_folder
from distributed_sae.export.saelens import push_export
from distributed_sae.sae import ReLUSAE, TopKSAE, save_sae
from conftest import HANG_S

hub = pytest.importorskip("huggingface_hub", reason="pip install 'distributed-sae[hub]'")

SAE = distributed_sae.SAE
META = {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post", "dataset_path": "cpython"}
SHA_MAIN, SHA_V1 = "a" * 40, "b" * 40
TOKEN = "hf_NotARealTokenButSecretAnyway1234"


def _bank(root: Path, seed: int = 0) -> dict[str, torch.nn.Module]:
    saes = {"topk_w32_k4_s0": TopKSAE(8, 32, k=4, seed=seed),
            "relu_w64_s1": ReLUSAE(8, 64, seed=seed + 1)}
    for name, sae in saes.items():
        save_sae(sae, root / name, metadata=META)
    return saes


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_top_level_sae_is_lazy_and_is_the_base_class():
    code = ("import sys, distributed_sae; assert 'torch' not in sys.modules; "
            "from distributed_sae import SAE; from distributed_sae.sae import SparseAutoencoder; "
            "assert SAE is SparseAutoencoder and callable(SAE.load)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=HANG_S)


def test_load_a_folder_and_a_bank(tmp_path):
    saes = _bank(tmp_path / "bank")
    one = SAE.load(tmp_path / "bank" / "topk_w32_k4_s0")
    assert isinstance(one, TopKSAE) and _same(one, saes["topk_w32_k4_s0"])
    assert one.cfg_dict["metadata"]["hook_name"] == META["hook_name"]
    assert _same(SAE.load(str(tmp_path / "bank"), member="relu_w64_s1"), saes["relu_w64_s1"])
    with pytest.raises(ValueError, match=r"bank of 2 SAEs: pass member=, one of "
                                         r"\['relu_w64_s1', 'topk_w32_k4_s0'\]"):
        SAE.load(tmp_path / "bank")
    with pytest.raises(FileNotFoundError, match="no SAE member 'nope'; its members are"):
        SAE.load(tmp_path / "bank", member="nope")
    with pytest.raises(ValueError, match="not a folder name"):
        SAE.load(tmp_path / "bank", member="../bank")
    with pytest.raises(ValueError, match="revision='v1' only applies to Hub repos"):
        SAE.load(tmp_path / "bank", member="relu_w64_s1", revision="v1")
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub repo id"):
        SAE.load(str(tmp_path / "missing" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no SAE"):
        SAE.load(tmp_path / "empty")
    single = tmp_path / "single"
    _bank(single)
    (single / "relu_w64_s1" / "cfg.json").unlink()  # one member left: no need to name it
    assert resolve_sae_folder(single) == single / "topk_w32_k4_s0"


def _hub_cache(hf_home: Path) -> dict[str, dict]:
    """models--org--bank with two commits: main and branch v1 (other weights)."""
    repo = hf_home / "hub" / "models--org--bank"
    banks = {}
    for sha, ref, seed in ((SHA_MAIN, "main", 0), (SHA_V1, "v1", 10)):
        banks[ref] = _bank(repo / "snapshots" / sha, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return banks


LOAD_FROM_CACHE = """
import json, sys, torch
from distributed_sae import SAE
x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
out = {}
with torch.no_grad():
    out["main"] = SAE.load("org/bank", member="topk_w32_k4_s0")(x).tolist()
    out["v1"] = SAE.load("org/bank", member="relu_w64_s1", revision="v1")(x).tolist()
for args in (("org/bank",), ("org/bank", "nope"), ("org/absent", "m")):
    try:
        SAE.load(*args)
    except Exception as exc:
        out[" ".join(args)] = f"{type(exc).__name__}: {exc}"
json.dump(out, sys.stdout)
"""


def test_load_from_the_hub_cache_offline(tmp_path):
    banks = _hub_cache(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", LOAD_FROM_CACHE], env=env, capture_output=True,
                          text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    # Same weights, computed in another process: equal up to the summation order a different
    # thread count may pick in the matmuls (the other revision's weights differ by O(1)).
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(out["main"]),
                                   banks["main"]["topk_w32_k4_s0"].eval()(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(out["v1"]),
                                   banks["v1"]["relu_w64_s1"].eval()(x), rtol=1e-5, atol=1e-6)
    assert "Hub repo org/bank is a bank of 2 SAEs: pass member=" in out["org/bank"]
    assert "no SAE member 'nope'" in out["org/bank nope"]
    assert "not in the Hub cache" in out["org/absent m"] and "HF_HUB_OFFLINE=1" in out["org/absent m"]


@pytest.fixture
def fake_hub(monkeypatch):
    """Record the calls HfApi would send to the Hub, whose servers cannot be reached here."""
    calls = []

    def recorder(name, result=None):
        def call(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return result
        return call

    monkeypatch.setattr(hub.HfApi, "create_repo", recorder("create_repo", "https://hf.co/org/x"))
    monkeypatch.setattr(hub.HfApi, "create_branch", recorder("create_branch"))
    monkeypatch.setattr(hub.HfApi, "upload_folder",
                        recorder("upload_folder", "https://hf.co/org/x/commit/123"))
    return calls


def test_push_passes_the_token_but_never_logs_or_writes_it(tmp_path, fake_hub, monkeypatch, caplog):
    """The Hub's servers cannot be reached here: HfApi's network methods are replaced."""
    _bank(tmp_path / "export")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    url = push_export(tmp_path / "export", "org/bank", revision="v2", private=True)
    assert url == "https://hf.co/org/x/commit/123"
    assert [c[0] for c in fake_hub] == ["create_repo", "create_branch", "upload_folder"]
    (_, args, repo_kw), (_, _, branch_kw), (_, _, upload_kw) = fake_hub
    assert args == ("org/bank",) and repo_kw["private"] is True and repo_kw["exist_ok"] is True
    assert branch_kw["branch"] == "v2" and branch_kw["exist_ok"] is True
    assert upload_kw["folder_path"] == str(tmp_path / "export") and upload_kw["revision"] == "v2"
    assert all(kw["token"] == TOKEN for _, _, kw in fake_hub)
    assert "org/bank" in caplog.text and TOKEN not in caplog.text
    written = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file())
    assert TOKEN not in written
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n")
    assert "[topk_w32_k4_s0](topk_w32_k4_s0/README.md)" in card
    assert 'SAE.from_pretrained("org/bank", "relu_w64_s1")' in card


def test_push_to_main_with_an_explicit_token(tmp_path, fake_hub, monkeypatch):
    _bank(tmp_path / "export")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    push_to_hub(tmp_path / "export", "org/bank", token="hf_explicit", commit_message="msg")
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]  # main: no branch
    assert fake_hub[-1][2]["token"] == "hf_explicit" and fake_hub[-1][2]["commit_message"] == "msg"
    assert fake_hub[-1][2]["revision"] is None and fake_hub[0][2]["private"] is False


def test_push_refuses_bad_input(tmp_path, fake_hub, monkeypatch):
    _bank(tmp_path / "export")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)  # and no stored `hf auth login`
    with pytest.raises(PermissionError, match="set HF_TOKEN"):
        push_to_hub(tmp_path / "export", "org/bank")
    with pytest.raises(ValueError, match="repo_id='not a repo' is not a Hub repo id"):
        push_to_hub(tmp_path / "export", "not a repo", token="t")
    with pytest.raises(FileNotFoundError, match="nothing to push"):
        push_to_hub(tmp_path / "nothing", "org/bank", token="t")
    with pytest.raises(FileNotFoundError, match="holds no exported SAE folders"):
        push_export(tmp_path, "org/bank", token="t")
    assert fake_hub == []
