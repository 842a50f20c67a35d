"""Tests of the feature analysis (top contexts, quantiles, density, logit effects) against
brute-force dense computations on a small synthetic store, and of feature matching (splitting
across widths, universality by activation correlation)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import write_sparse_store
from distributed_sae.config import ModelConfig
from distributed_sae.eval.features import (
    RunningTopN, feature_report, logit_effects, unembedding, write_feature_report,
)
from distributed_sae.eval.matching import activation_correlation, feature_splitting
from distributed_sae.models import from_hf_model, load_model
from distributed_sae.sae import ReLUSAE, TopKSAE

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_sparse_store(tmp_path_factory.mktemp("feat") / "s")  # 4096 rows, d 32, ctx 64


def _sparse_sae(d_sae: int = 24, seed: int = 0) -> ReLUSAE:
    sae = ReLUSAE(32, d_sae, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)  # fire on some tokens only
        sae.b_enc[0] = -1e6  # never fires
    return sae


def test_running_topn_equals_full_sort() -> None:
    acts = torch.rand(1000, 50, generator=torch.Generator().manual_seed(0))
    top = RunningTopN(10, 50)
    for s in range(0, 1000, 37):  # uneven batches, the last one shorter than n
        top.update(acts[s:s + 37], torch.arange(s, min(s + 37, 1000)))
    values, rows = acts.topk(10, dim=0)
    torch.testing.assert_close(top.values, values, rtol=0, atol=0)
    assert torch.equal(top.rows, rows)


def test_feature_report_matches_brute_force(store) -> None:
    sae = _sparse_sae()
    rows = range(1000, 4096)  # starts mid-context: windows must stay inside the range
    store.metadata["exclude_token_ids"] = [5, 6]  # these rows count as not firing
    try:
        report = feature_report(sae, store, HOOK, rows, None, None, batch_size=300, n_top=5,
                                window=3, member="m")
    finally:
        store.metadata["exclude_token_ids"] = []
    tokens = store.tokens(rows.start, rows.stop)
    keep = ~np.isin(tokens, [5, 6])
    with torch.no_grad():
        f = sae.encode(store.read(HOOK, rows.start, rows.stop))  # (rows, d_sae) dense
    f[torch.from_numpy(~keep)] = 0
    assert set(report) == {"member", "hook", "d_sae", "n_tokens", "features"}
    assert (report["member"], report["d_sae"], report["n_tokens"]) == ("m", 24, int(keep.sum()))
    json.dumps(report)  # JSON-serialisable as it is
    never = report["features"][0]
    assert never["density"] == 0 and never["top_contexts"] == [] and never["quantiles"]["max"] == 0
    for j, feat in enumerate(report["features"]):
        col = f[:, j]
        assert feat["index"] == j
        assert feat["density"] == pytest.approx(float((col > 0).sum()) / keep.sum())
        top = col.topk(5)
        got = [c["activation"] for c in feat["top_contexts"]]
        want = [float(v) for v in top.values if v > 0]
        assert got == pytest.approx(want, rel=1e-6)
        for ctx, r in zip(feat["top_contexts"], top.indices.tolist()):
            row = rows.start + r
            lo = max(row - 3, row // 64 * 64, rows.start)  # window clipped to context and range
            hi = min(row + 4, row // 64 * 64 + 64, rows.stop)
            assert ctx["focus"] == row - lo
            assert ctx["tokens"] == [str(t) for t in tokens[lo - rows.start:hi - rows.start]]
            assert ctx["acts"] == pytest.approx(col[lo - rows.start:hi - rows.start].tolist(),
                                                abs=1e-4)
        fired = col[col > 0]
        if len(fired) >= 50:  # histogram quantiles: within one bin (x1.155) of the exact ones
            for q in (0.5, 0.9):
                exact = float(torch.quantile(fired, q))
                assert feat["quantiles"][str(q)] == pytest.approx(exact, rel=0.16)
        if len(fired):
            assert feat["quantiles"]["max"] == pytest.approx(float(fired.max()))
    assert sum(len(x["top_contexts"]) > 0 for x in report["features"]) > 10  # a real test


def test_feature_report_draws_one_bar_over_both_passes(store, capsys) -> None:
    """A progress bar on stderr named after the member: 4 batches of 256 rows, twice (the
    statistics pass, then the windows of the top contexts); nothing on stdout."""
    feature_report(_sparse_sae(), store, HOOK, range(0, 1024), None, None, batch_size=256,
                   member="m7")
    out, err = capsys.readouterr()
    totals = re.findall(r"features m7:.*?\d+/(\d+) ", err)
    assert totals and set(totals) == {"8"}, err
    assert "features m7" not in out


def test_feature_report_subset_and_errors(store, tmp_path) -> None:
    sae = _sparse_sae()
    full = feature_report(sae, store, HOOK, range(2048, 4096), None, None, n_top=3)
    sub = feature_report(sae, store, HOOK, range(2048, 4096), None, None, n_top=3,
                         features=[7, 3])
    assert [x["index"] for x in sub["features"]] == [7, 3]
    assert sub["features"][0] == full["features"][7]
    path = write_feature_report(sub, tmp_path / "eval" / "m")
    assert json.loads(path.read_text())["features"][1]["index"] == 3
    with pytest.raises(ValueError, match="d_in is 16"):
        feature_report(ReLUSAE(16, 8), store, HOOK, range(0, 100), None, None)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    loaded = load_model(ModelConfig(name=tiny_llama_dir))
    with torch.no_grad():  # a non-trivial final-norm gain, so folding it in is tested
        gain = torch.rand(32, generator=torch.Generator().manual_seed(4)) + 0.5
        loaded.model.model.norm.weight.copy_(gain)
    return loaded


def test_logit_effects_direct_matmul(store, tiny_llama, smollm2_tokenizer) -> None:
    head = tiny_llama.model.lm_head.weight.detach()  # (vocab, 32)
    gain = tiny_llama.model.model.norm.weight.detach()
    u = unembedding(tiny_llama, HOOK)
    torch.testing.assert_close(u, gain[:, None] * head.T)
    down = tiny_llama.model.model.layers[1].mlp.down_proj.weight.detach()  # (32, 64)
    torch.testing.assert_close(unembedding(tiny_llama, "blocks.1.mlp.hook_post"), down.T @ u)
    sae = _sparse_sae()
    tv, ti, bv, bi = logit_effects(sae, u, n=4, chunk=5)
    direct = sae.W_dec.detach() @ u  # (d_sae, vocab)
    torch.testing.assert_close(tv, direct.topk(4, dim=1).values)
    torch.testing.assert_close(bv, direct.topk(4, dim=1, largest=False).values)
    assert torch.equal(ti, direct.topk(4, dim=1).indices)
    # Through feature_report, decoded with the tokenizer.
    report = feature_report(sae, store, HOOK, range(3072, 4096), smollm2_tokenizer, u, n_top=2,
                            n_logits=4, features=[2])
    feat = report["features"][0]
    want = [smollm2_tokenizer.decode([i]) for i in ti[2].tolist()]
    assert [t for t, _ in feat["logits_top"]] == want
    assert [v for _, v in feat["logits_bottom"]] == pytest.approx(bv[2].tolist())
    assert all(isinstance(t, str) for c in feat["top_contexts"] for t in c["tokens"])


def test_unembedding_layernorm_centres() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = from_hf_model(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                                    n_positions=32)))
    u = unembedding(gpt2, "blocks.1.hook_resid_post")  # (16, 50)
    # A direction along the all-ones vector is removed by LayerNorm: no effect on the logits.
    torch.testing.assert_close(torch.ones(16) @ u, torch.zeros(50), atol=1e-5, rtol=0)
    assert unembedding(gpt2, "blocks.0.mlp.hook_post").shape == (64, 50)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def test_feature_splitting_finds_planted_split() -> None:
    g = torch.Generator().manual_seed(0)
    small, large = TopKSAE(64, 8, k=2, seed=1), TopKSAE(64, 20, k=2, seed=2)
    parent = small.W_dec.detach()[3]
    with torch.no_grad():  # two children at cosine ~0.9 with feature 3 of the small SAE
        large.W_dec[5] = _unit(parent + 0.45 * _unit(torch.randn(64, generator=g)))
        large.W_dec[11] = _unit(parent + 0.45 * _unit(torch.randn(64, generator=g)))
    res = feature_splitting(small, large, threshold=0.5)
    feat3 = res["features"][3]
    assert {j for j, _ in feat3["children"]} == {5, 11} and feat3["best"] in (5, 11)
    assert feat3["best_cosine"] > 0.8 and feat3["children"][0][1] >= feat3["children"][1][1]
    assert res["split_fraction"] == pytest.approx(1 / 8)
    same = feature_splitting(small, small)
    assert same["mean_max_cosine"] == pytest.approx(1.0) and same["split_fraction"] == 0
    assert [f["best"] for f in same["features"]] == list(range(8))
    with pytest.raises(ValueError, match="same hook"):
        feature_splitting(small, TopKSAE(32, 8, k=2))


def test_universality_self_permuted_and_brute_force(store) -> None:
    a = _sparse_sae(seed=0)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    b = ReLUSAE(32, 24)
    with torch.no_grad():  # b's feature j is a's feature perm[j]
        for name in ("W_dec", "b_enc"):
            getattr(b, name).copy_(getattr(a, name)[perm])
        b.W_enc.copy_(a.W_enc[:, perm])
        b.b_dec.copy_(a.b_dec)
    batches = [store.read(HOOK, s, s + 512) for s in range(0, 2048, 512)]
    for other in (a, b):
        res = activation_correlation(a, other, batches)
        assert res["live_a"] == 23  # feature 0 never fires
        assert res["mean_max_corr_a"] == pytest.approx(1.0, abs=1e-6)
        assert res["mean_max_corr_b"] == pytest.approx(1.0, abs=1e-6)
    inverse = torch.argsort(perm)
    assert res["best_b_for_a"][1:] == inverse[1:].tolist() and res["max_corr_a"][0] is None
    # Chunked (several passes over the data) equals one pass, and both equal numpy's corrcoef.
    c = _sparse_sae(d_sae=16, seed=5)
    one = activation_correlation(a, c, batches)
    chunked = activation_correlation(a, c, batches, max_pairs=24 * 5)
    assert chunked["max_corr_a"] == one["max_corr_a"] and chunked["max_corr_b"] == one["max_corr_b"]
    with torch.no_grad():
        x = torch.cat(batches)
        fa, fc = a.encode(x).numpy(), c.encode(x).numpy()
    live_a, live_c = fa.std(0) > 0, fc.std(0) > 0
    corr = np.corrcoef(fa[:, live_a].T, fc[:, live_c].T)[: live_a.sum(), live_a.sum():]
    got = [v for v in one["max_corr_a"] if v is not None]
    assert got == pytest.approx(corr.max(1).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="one-shot iterator"):
        activation_correlation(a, c, iter(batches), max_pairs=24 * 5)
