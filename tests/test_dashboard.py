"""Plots and the static feature dashboard, the latter loaded in a real headless Chromium.

The browser test drives Chromium's command line only (no selenium, no DevTools client):
`chromium --headless --dump-dom` loads a copy of the dashboard into which the test put two
scripts, one at the top of <head> recording every JS error and unhandled rejection, one at the
end of <body> that runs after the dashboard's script, exercises its search/filter API and writes
a JSON report into the DOM. The dumped DOM then holds both the rendered cards and that report.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from distributed_sae.eval.dashboard import embed_json, write_bank_index, write_dashboard, write_dashboards
from distributed_sae.eval.plots import plot_bank, plot_density, plot_frontier
from conftest import HANG_S

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A 1x1 PNG: the browser test needs an image to embed, not matplotlib.
TINY_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAj"
                            "CB0C8AAAAASUVORK5CYII=")
NASTY = ["</script>", "<b>bold</b>", " &amp;", " caf\u00e9 \U0001F642", "line\nbreak", "\"q'",
         "<!--", "\u2028", "</"]
N_FEATURES = 230  # more than a page: the page must paginate, not render everything
DEAD = (7, 100)
# Features the interp stage explained: (index, detection score); the best is 9.
EXPLAINED = ((3, 0.6), (9, 0.95), (150, 0.7))


def _metrics(member: str, d_sae: int, l0: float, fvu: float, **extra):
    log10 = [-10.0 if i % 5 == 0 else -3.0 + (i % 7) * 0.3 for i in range(d_sae)]
    return {"member": member, "hook": "blocks.3.hook_resid_post", "d_sae": d_sae, "n_tokens": 4096,
            "mse": 0.1, "fvu": fvu, "explained_variance": 1 - fvu, "l0": l0,
            "dead_fraction": 0.2, "dense_fraction": 0.0, "log10_density": log10,
            "training_tokens": 100_000, **extra}


def _feature(i: int) -> dict:
    if i in DEAD:
        return {"index": i, "density": 0.0, "log10_density": -10.0,
                "quantiles": {"0.5": 0.0, "0.9": 0.0, "0.99": 0.0, "max": 0.0},
                "top_contexts": [], "logits_top": [], "logits_bottom": []}
    tokens = NASTY if i == 0 else [" the", f" word{i}", " and", " more"]
    acts = [float(j % 3) for j in range(len(tokens))]
    return {"index": i, "density": 0.001 * (i + 1), "log10_density": math.log10(0.001 * (i + 1)),
            "quantiles": {"0.5": 0.1, "0.9": 0.5, "0.99": 1.5, "max": 2.0},
            "top_contexts": [{"activation": 2.0, "tokens": tokens, "acts": acts, "focus": 1}],
            "logits_top": [[" Paris", 1.25], ["<i>", 0.5]],
            "logits_bottom": [[f" minus{i}", -0.75]]}


@pytest.fixture(scope="module")
def features():
    feats = [_feature(i) for i in range(N_FEATURES)]
    for i, score in EXPLAINED:  # as interp/stage.py annotates features.json
        feats[i]["interp"] = {"explanation": f"mentions of cheese {i}", "detection": score,
                              "fuzzing": 0.5, "simulation": None}
    return {"member": "topk_w256_k8_s0", "hook": "blocks.3.hook_resid_post", "d_sae": N_FEATURES,
            "n_tokens": 4096, "features": feats}


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install matplotlib")


@pytest.fixture(scope="module")
def bank():
    return {"topk_w256_k8_s0": _metrics("topk_w256_k8_s0", 256, 8.0, 0.3, loss_recovered=0.8,
                                        kl_div=0.1, ce_clean=3.0, ce_spliced=3.2, ce_zero=4.0),
            "topk_w512_k8_s1": _metrics("topk_w512_k8_s1", 512, 8.0, 0.25),
            "topk_w512_k32_s2": _metrics("topk_w512_k32_s2", 512, 32.0, 0.12, loss_recovered=0.9)}


# ---- plots ----------------------------------------------------------------------------------
def test_frontier_and_density_plots_are_pngs(tmp_path, bank, mpl):
    frontier = plot_frontier(bank, tmp_path / "frontier.png")
    assert frontier.read_bytes()[:8] == PNG_MAGIC
    # Without loss_recovered anywhere the figure has one panel: narrower than with two.
    fvu_only = {k: {kk: vv for kk, vv in m.items() if kk != "loss_recovered"} for k, m in bank.items()}
    single = plot_frontier(list(fvu_only.values()), tmp_path / "single.png")
    assert len(single.read_bytes()) < len(frontier.read_bytes())
    density = plot_density(bank["topk_w256_k8_s0"], tmp_path / "d" / "density.png")
    assert density.read_bytes()[:8] == PNG_MAGIC
    made = plot_bank(bank, tmp_path / "bank")
    assert set(made) == {"frontier", *(f"density/{m}" for m in bank)}
    assert all(p.is_file() for p in made.values())


def test_plots_refuse_metrics_without_the_needed_keys(tmp_path, bank, mpl):
    with pytest.raises(ValueError, match="no finite l0/fvu"):
        plot_frontier({"a": {"l0": 3.0}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no members"):
        plot_frontier({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no log10_density"):
        plot_density({"member": "a", "l0": 1.0}, tmp_path / "x.png")


# ---- the page itself --------------------------------------------------------------------------
def test_embedded_json_cannot_close_its_script_element(features):
    text = embed_json(features)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == features  # the \\u003c escapes read back as the original text
    assert json.loads(embed_json({"x": float("nan")})) == {"x": None}  # JSON.parse rejects NaN


def test_dashboard_is_self_contained(tmp_path, bank, mpl, features):
    plots = plot_bank(bank, tmp_path)
    page = write_dashboard(tmp_path / "d", bank["topk_w256_k8_s0"], features,
                           {"frontier": plots["frontier"]})
    text = page.read_text(encoding="utf-8")
    assert page.name == "dashboard.html" and "data:image/png;base64," in text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)  # no network fetches
    assert text.count("</script>") == 2  # the JSON and the JS; no token closed one early
    assert "loss recovered" in text and "0.8" in text
    with pytest.raises(ValueError, match="features are of member"):
        write_dashboard(tmp_path / "x.html", {"member": "other"}, features)
    with pytest.raises(ValueError, match="'features' list"):
        write_dashboard(tmp_path / "x.html", {}, {"member": "m"})


def test_write_dashboards_builds_the_bank(tmp_path, bank, mpl, features):
    (tmp_path / "topk_w256_k8_s0").mkdir()
    (tmp_path / "topk_w256_k8_s0" / "features.json").write_text(json.dumps(features))
    index = write_dashboards(tmp_path, bank)
    text = index.read_text()
    assert 'href="topk_w256_k8_s0/dashboard.html"' in text and "data:image/png" in text
    assert (tmp_path / "frontier.png").is_file()
    for name in bank:
        assert (tmp_path / name / "dashboard.html").is_file()
        assert (tmp_path / name / "density.png").is_file()
    assert "Feature" not in (tmp_path / "topk_w512_k8_s1" / "dashboard.html").read_text().split(
        "dsae-data")[1].split("</script>")[0]  # no features.json: none embedded
    assert write_bank_index(tmp_path / "empty", {}).is_file()


# ---- in a real browser ----------------------------------------------------------------------
ERRORS_FIRST = """<script>window.__errs = [];
window.addEventListener("error", function (e) { __errs.push("error: " + e.message); });
window.addEventListener("unhandledrejection", function (e) { __errs.push("rejection: " + e.reason); });
</script>"""

# Runs after the dashboard's script, once the page (and its data: images) has loaded.
PROBE_LAST = r"""<script>window.addEventListener("load", function () {
  var r = {};
  try {
    r.image_width = document.querySelector("#plots img").naturalWidth;
    var first = document.querySelector("#features .card");
    r.initial_cards = document.querySelectorAll("#features .card").length;
    r.first_id = first && first.id;
    r.first_tokens = Array.prototype.map.call(first.querySelectorAll(".tok"),
                                              function (s) { return s.textContent; });
    r.injected_elements = document.querySelectorAll("#features b, #features i, #features script").length;
    r.dead_hidden = !document.getElementById("f7");
    r.by_index_dead = dsaeDashboard.search("7") >= 1 && !!document.getElementById("f7");
    r.by_text = dsaeDashboard.search("word42");
    r.by_text_id = document.querySelector("#features .card").id;
    r.by_emoji = dsaeDashboard.search("\uD83D\uDE42");
    r.by_script_token = dsaeDashboard.search("<\/script>");  // "<\/" as this script is inline
    r.by_logit = dsaeDashboard.search("minus137");
    r.nothing = dsaeDashboard.search("no such token anywhere");
    dsaeDashboard.setHideDead(false);
    r.all_pages = document.getElementById("page-info").textContent;
    r.by_explanation = dsaeDashboard.search("cheese");
    r.explanation_shown = document.querySelector("#features .card .interp").textContent;
    dsaeDashboard.search("");
    document.getElementById("sort").value = "detection-desc";
    document.getElementById("sort").dispatchEvent(new Event("change"));
    r.by_detection = Array.prototype.slice.call(document.querySelectorAll("#features .card"), 0, 4)
      .map(function (c) { return c.id; });
    document.getElementById("explained-only").click();
    r.explained_only = document.querySelectorAll("#features .card").length;
    document.getElementById("explained-only").click();
    document.getElementById("sort").value = "density-desc";
    document.getElementById("sort").dispatchEvent(new Event("change"));
    r.densest = document.querySelector("#features .card").id;
    document.getElementById("next").click();
    r.page2_first = document.querySelector("#features .card").id;
    document.getElementById("sort").value = "index";  // back to the first page for the dump
    document.getElementById("sort").dispatchEvent(new Event("change"));
  } catch (e) { __errs.push("probe: " + e); }
  r.errors = __errs;
  var out = document.createElement("pre");
  out.id = "dsae-probe";
  out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
});</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    # A real browser is part of the test's promise: fail, don't skip (scripts/test.sh installs it).
    pytest.fail("headless Chromium is not installed: apt-get install -y chromium "
                "(scripts/test.sh installs it when run as root)")


def _dump_dom(browser: str, page: Path, profile: Path) -> str:
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", f"--user-data-dir={profile}", "--virtual-time-budget=3000",
         # Any network request would fail: the page must not need one.
         "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_dashboard_renders_in_headless_chromium(tmp_path, bank, features):
    browser = _chromium()
    (tmp_path / "tiny.png").write_bytes(TINY_PNG)
    page = write_dashboard(tmp_path / "dashboard.html", bank["topk_w256_k8_s0"], features,
                           {"frontier": tmp_path / "tiny.png"})
    text = page.read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + ERRORS_FIRST, 1)
                      .replace("</body>", PROBE_LAST + "</body>", 1), encoding="utf-8")
    dom = _dump_dom(browser, probed, tmp_path / "profile")
    found = re.search(r'<pre id="dsae-probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; DOM tail: {dom[-1500:]}"
    r = json.loads(html.unescape(found.group(1)))
    assert r["errors"] == []
    assert r["image_width"] == 1  # the data: URI decoded
    # Feature 0 is first, its nasty tokens shown as text (newlines made visible), none as markup.
    assert r["initial_cards"] == 20 and r["first_id"] == "f0"
    assert r["first_tokens"] == [t.replace("\n", "\u21b5") for t in NASTY]
    assert r["injected_elements"] == 0
    assert r["dead_hidden"] and r["by_index_dead"]
    assert (r["by_text"], r["by_text_id"]) == (1, "f42")
    assert r["by_emoji"] == 1 and r["by_script_token"] == 1 and r["by_logit"] == 1
    assert r["nothing"] == 0
    # The interp stage's explanations: searchable, shown on the card, sortable by score.
    assert r["by_explanation"] == len(EXPLAINED)
    assert r["explanation_shown"].startswith("mentions of cheese 3") and "detection 0.6" in \
        r["explanation_shown"]
    assert r["by_detection"][:3] == ["f9", "f150", "f3"] and r["by_detection"][3] == "f0"
    assert r["explained_only"] == len(EXPLAINED)
    assert f"of {N_FEATURES} features ({len(DEAD)} dead)" in r["all_pages"]
    assert r["densest"] == f"f{N_FEATURES - 1}" and r["page2_first"] == f"f{N_FEATURES - 21}"
    # The dumped DOM (after scripts ran) holds the first card with its context text, escaped.
    card = dom[dom.index('id="f0"'):]
    assert "&lt;/script&gt;" in card[:4000] and "Feature #0" in card[:4000]
