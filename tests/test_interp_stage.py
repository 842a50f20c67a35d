"""The interp stage end to end: a tiny trained bank (3-layer Llama, real Ray harvest, real
store), explained and scored by the real SmolLM2-135M-Instruct served over a real
OpenAI-compatible HTTP server on loopback that fails some requests on purpose. The same stage
with interp.backend=local calls the model in process; here the HTTP path is the one exercised,
since a hosted API cannot be reached from this machine. A rerun makes no calls (the cache)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_sae.cli import run_stages

from test_pipeline import compose_run
from conftest import HANG_S

MEMBER = "topk_w64_k4_s0"


def tiny_run(model_dir: str, out: Path, *extra: str):
    return compose_run([
        f"model.name={model_dir}", f"out_dir={out}", "data.context_size=32",
        f"data.n_tokens={32 * 4 * 40}", "data.seed=1", "harvest.hooks=[blocks.1.hook_resid_post]",
        "harvest.contexts_per_unit=4", "harvest.batch_size=2", "harvest.num_actors=1",
        "store.chunk_tokens=64", "sae.widths=[64]", "sae.k=4", "train.batch_size=128",
        "train.tokens=20480", "train.holdout_fraction=0.25", "eval.spliced=false", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, ray_local):
    out = tmp_path_factory.mktemp("interp_run")
    run_stages(tiny_run(tiny_llama_dir, out), ("harvest", "train", "eval"))
    return out


@pytest.fixture(scope="module")
def server():
    from distributed_sae.interp.local_backend import LocalBackend
    from distributed_sae.interp.serve import serve

    import torch

    # One torch thread: on a busy 2-core machine two threads generated 7-9x slower than one
    # (measured by the LLM client's tests while CI ran beside them).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    handle = serve(LocalBackend("smollm2-135m"), "smollm2-135m", api_key="sk-test-123",
                   fail_every=5)
    yield handle
    handle.close()
    torch.set_num_threads(threads)


def interp_args(url: str, *extra: str) -> list[str]:
    # 2 features, 1 MLP neuron, 1 residual direction; windows of 8 tokens, 2 + 2 per scorer.
    return ["interp.backend=openai", f"interp.base_url={url}", "interp.model=smollm2-135m",
            "interp.api_key_env=DSAE_TEST_KEY", "interp.features=2", "interp.neurons=1",
            "interp.window=8", "interp.explain_top=2", "interp.explain_quantile=1",
            "interp.score_active=2", "interp.score_inactive=2", "interp.concurrency=3",
            "interp.tokens=640", *extra]


def test_the_stage_explains_scores_and_caches(trained, tiny_llama_dir, server, monkeypatch):
    monkeypatch.setenv("DSAE_TEST_KEY", "sk-test-123")
    cfg = tiny_run(tiny_llama_dir, trained, *interp_args(server.url))
    run_stages(cfg, ("interp",))
    out = trained / "interp"
    member = json.loads((out / f"{MEMBER}.json").read_text())
    assert member["hook"] == "blocks.1.hook_resid_post" and len(member["units"]) == 2
    baselines = sorted(p.name for p in out.glob("baseline_*.json"))
    assert baselines == ["baseline_1_neuron.json", "baseline_1_resid_hook_resid_post.json"]
    for path in [out / f"{MEMBER}.json", *(out / b for b in baselines)]:
        for unit in json.loads(path.read_text())["units"]:
            assert unit["explanation"]  # SmolLM2's words, whatever they are
            assert 0.0 <= unit["detection"] <= 1.0 and 0.0 <= unit["fuzzing"] <= 1.0
            assert -1.0 <= unit["simulation"] <= 1.0 and unit["n_active"] <= 2
    summary = json.loads((out / "summary.json").read_text())
    usage = summary["usage"]
    assert usage["requests"] > 0 and usage["failed_attempts"] >= 1  # the server failed some
    assert summary["members"][MEMBER]["detection"]["n"] == 2
    assert set(summary["by_width"]) == {"64"}
    assert (out / f"hist_{MEMBER}_detection.png").stat().st_size > 0
    assert "features" in (out / "summary.md").read_text()
    feats = json.loads((trained / "eval" / MEMBER / "features.json").read_text())["features"]
    explained = [f for f in feats if "interp" in f]
    assert sorted(f["index"] for f in explained) == sorted(u["index"] for u in member["units"])
    assert "sk-test-123" not in "".join(p.read_text() for p in out.rglob("*.json"))

    served = server.requests_served
    run_stages(cfg, ("interp",))  # a rerun: every answer from the cache, no request sent
    assert server.requests_served == served
    again = json.loads((out / "summary.json").read_text())
    answered = usage["requests"] - usage["failed_attempts"]  # calls that got an answer
    assert again["usage"]["requests"] == 0 and again["usage"]["cached"] == answered
    assert json.loads((out / f"{MEMBER}.json").read_text()) == member


def test_rating_page_dashboard_and_model_card(trained, tiny_llama_dir, server, monkeypatch):
    """After the stage: the blind page and its key, a person's ratings (written here as the
    page's Save would) turned into features vs neurons by the same command, the scores in the
    member's dashboard and in the export's model card."""
    monkeypatch.setenv("DSAE_TEST_KEY", "sk-test-123")
    run_stages(tiny_run(tiny_llama_dir, trained, *interp_args(server.url)), ("interp",))
    out = trained / "interp"
    key = json.loads((out / "rate_key.json").read_text())
    kinds = sorted(u["kind"] for u in key["units"].values())
    assert kinds == ["feature", "feature", "neuron"]  # 2 features, 1 MLP neuron (no resid)
    page = (out / "rate.html").read_text(encoding="utf-8")
    assert all(uid in page for uid in key["units"]) and MEMBER not in page

    from distributed_sae.interp.rating import RUBRIC

    ratings = {uid: {c["key"]: (c["max"] if u["kind"] == "feature" else 0) for c in RUBRIC}
               for uid, u in key["units"].items()}
    saved = trained / "my_ratings.json"
    saved.write_text(json.dumps({"page": key["page"], "rater": "test", "ratings": ratings}))
    cfg = tiny_run(tiny_llama_dir, trained, *interp_args(server.url),
                   f"interp.ratings={saved}")
    served = server.requests_served
    run_stages(cfg, ("interp",))
    assert server.requests_served == served  # ratings need no LLM
    summary = json.loads((out / "ratings_summary.json").read_text())
    assert summary["members"][MEMBER]["features"]["mean"] == 14.0
    assert summary["members"][MEMBER]["neurons"] == {"n": 1, "mean": 0.0, "median": 0.0,
                                                      "std": 0.0, "q1": 0.0, "q3": 0.0}

    member = json.loads((out / f"{MEMBER}.json").read_text())
    dashboard = (trained / "eval" / MEMBER / "dashboard.html").read_text(encoding="utf-8")
    assert '"interp":{"explanation":' in dashboard  # rebuilt with the stage's explanations
    run_stages(tiny_run(tiny_llama_dir, trained), ("export",))
    card = (trained / "export" / MEMBER / "README.md").read_text()
    assert "## Interpretability" in card and "smollm2-135m" in card
    assert "Blind human ratings (points out of 14): features 14.000" in card
    mean = sum(u["detection"] for u in member["units"]) / len(member["units"])
    assert f"| detection | {mean:.3f}" in card
    assert (trained / "export" / MEMBER / "interp_detection.png").stat().st_size > 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_backend_settings_are_one_line_errors(trained, tiny_llama_dir, server):
    """dsae-interp itself: exit code 2 and a line naming the setting; the cache stays empty."""
    good = "sk-test-123"
    cases = [  # (overrides, the key in $DSAE_TEST_KEY, what the error line must name)
        ([f"interp.base_url=http://127.0.0.1:{_closed_port()}/v1"], good, "interp.base_url="),
        ([f"interp.base_url={server.url}"], None, "$DSAE_TEST_KEY is unset"),
        ([f"interp.base_url={server.url}"], "sk-wrong", "refused the key in $DSAE_TEST_KEY"),
        ([f"interp.base_url={server.url}", "interp.model=no-such-model"], good,
         "interp.model=no-such-model"),
        (["interp.members=[nope]"], good, "interp.members"),
        (["interp.backend=claude"], good, "interp.backend"),
    ]
    for i, (extra, key, named) in enumerate(cases):
        cache = trained / f"bad_cache_{i}"
        args = [f"model.name={tiny_llama_dir}", f"out_dir={trained}",
                "harvest.hooks=[blocks.1.hook_resid_post]", "data.context_size=32",
                "harvest.contexts_per_unit=4", "store.chunk_tokens=64", "sae.widths=[64]",
                "sae.k=4", "interp.backend=openai", "interp.api_key_env=DSAE_TEST_KEY",
                f"interp.cache_dir={cache}", *extra]
        env = {k: v for k, v in os.environ.items() if k != "DSAE_TEST_KEY"}
        if key:
            env["DSAE_TEST_KEY"] = key
        proc = subprocess.run([sys.executable, "-c", "from distributed_sae.cli import "
                               "interp_main; interp_main()", *args], env=env,
                              capture_output=True, text=True, timeout=HANG_S)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, (extra, out[-2000:])
        errors = [line for line in out.splitlines() if "[ERROR]" in line]
        assert len(errors) == 1 and named in errors[0], (extra, errors or out[-2000:])
        assert "Traceback" not in out and "sk-wrong" not in out, (extra, out[-2000:])
        assert not cache.exists() or not any(cache.rglob("*.json")), extra
