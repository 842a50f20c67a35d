"""The blind rating page in a real headless Chromium, and its ratings turned into the
features-vs-neurons comparison.

The page is loaded twice with the same browser profile: the first load rates units by clicking
its radio buttons, typing an interpretation and pressing "no interpretation"; the second load
checks the ratings came back from localStorage. What "Save ratings" would download
(dsaeRating.ratingsJSON()) is then completed for the other units here and summarised.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from distributed_sae.config import ConfigError
from distributed_sae.interp.rating import KEY_FILE, MAX_TOTAL, RUBRIC, summarize_ratings, write_rating_page
from distributed_sae.interp.types import Example, UnitExamples

from test_dashboard import ERRORS_FIRST, _chromium, _dump_dom

MEMBER = "topk_w64_k4_s0"
BASELINE = "baseline_1_neuron"
NASTY = ["</script>", "<b>x</b>", " &amp;", "line\nbreak"]


def _unit(name: str, j: int) -> UnitExamples:
    ex = [Example(NASTY if j == 0 else [" the", f" tok{j}", " end"], [0.0, 1.0 + j, 0.5, 0.0][:4])
          for _ in range(2)]
    return UnitExamples(name, ex, [], [], [f" promo{j}"])


def _groups(n: int = 5) -> dict:
    return {MEMBER: ("feature", [10 + j for j in range(n)], [_unit("feature", j) for j in range(n)]),
            BASELINE: ("neuron", [200 + j for j in range(n)], [_unit("neuron", j) for j in range(n)])}


@pytest.fixture
def page(tmp_path):
    members = {MEMBER: {"hook": "blocks.1.hook_resid_post", "baselines": [BASELINE]}}
    return write_rating_page(tmp_path, _groups(), members, per_group=4, seed=0)


FIRST = r"""<script>window.addEventListener("load", function () {
  var r = {};
  try {
    var units = JSON.parse(document.getElementById("dsae-rating").textContent).units;
    r.cards = document.querySelectorAll(".card").length;
    r.injected = document.querySelectorAll("#units .ctx *:not(.tok)").length;
    var a = units[0].id, b = units[1].id;
    [["confidence", 3], ["activations", 4], ["logits", 1], ["specificity", 2]].forEach(function (p) {
      document.getElementById("r-" + a + "-" + p[0] + "-" + p[1]).click();
    });
    var t = document.getElementById("t-" + a);
    t.value = "the word 'the'"; t.dispatchEvent(new Event("input"));
    Array.prototype.filter.call(document.querySelectorAll("#u-" + b + " button"),
      function (x) { return /no interpretation/.test(x.textContent); })[0].click();
    dsaeRating.setScore(units[2].id, "confidence", 2);  // rated in part
    r.done = document.querySelectorAll(".card.done").length;
    r.progress = document.getElementById("progress").textContent;
    r.saved = JSON.parse(dsaeRating.ratingsJSON());
    r.ids = units.map(function (u) { return u.id; });
  } catch (e) { __errs.push("probe: " + e); }
  r.errors = __errs;
  var out = document.createElement("pre"); out.id = "dsae-probe"; out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
});</script>"""

SECOND = r"""<script>window.addEventListener("load", function () {
  var r = {};
  try {
    var units = JSON.parse(document.getElementById("dsae-rating").textContent).units;
    r.saved = JSON.parse(dsaeRating.ratingsJSON());
    r.checked = document.getElementById("r-" + units[0].id + "-activations-4").checked;
    r.text = document.getElementById("t-" + units[0].id).value;
  } catch (e) { __errs.push("probe: " + e); }
  r.errors = __errs;
  var out = document.createElement("pre"); out.id = "dsae-probe"; out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
});</script>"""


def _probe(browser: str, page: Path, probe: str, profile: Path) -> dict:
    probed = page.with_name("probed.html")  # the same file:// origin both times
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + ERRORS_FIRST, 1)
                      .replace("</body>", probe + "</body>", 1), encoding="utf-8")
    dom = _dump_dom(browser, probed, profile)
    found = re.search(r'<pre id="dsae-probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; DOM tail: {dom[-1500:]}"
    return json.loads(html.unescape(found.group(1)))


def test_the_page_is_blind_and_self_contained(page):
    text = page.read_text(encoding="utf-8")
    for hidden in (MEMBER, BASELINE, "neuron", "feature", '"index"', '"kind"'):
        assert hidden not in text, hidden  # nothing on the page says what a unit is
    key = json.loads((page.parent / KEY_FILE).read_text())
    assert len(key["units"]) == 8  # 4 of each group
    kinds = [key["units"][uid]["kind"] for uid in re.findall(r'"id":"(u[0-9a-f]+)"', text)]
    assert sorted(kinds) == ["feature"] * 4 + ["neuron"] * 4
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # shuffled
    assert "http://" not in text and "https://" not in text


def test_rating_in_a_browser_persists_and_summarises(tmp_path, page):
    browser = _chromium()
    profile = tmp_path / "profile"
    r = _probe(browser, page, FIRST, profile)
    assert r["errors"] == [] and r["cards"] == 8 and r["injected"] == 0
    a, b, c = r["ids"][:3]
    assert r["saved"]["ratings"][a] == {"confidence": 3, "activations": 4, "logits": 1,
                                        "specificity": 2, "interpretation": "the word 'the'"}
    assert r["saved"]["ratings"][b] == {x["key"]: 0 for x in RUBRIC}
    assert r["saved"]["ratings"][c] == {"confidence": 2}
    assert r["done"] == 2 and r["progress"] == "2 of 8 rated"
    again = _probe(browser, page, SECOND, profile)  # a reload: the ratings are still there
    assert again["errors"] == [] and again["saved"]["ratings"] == r["saved"]["ratings"]
    assert again["checked"] is True and again["text"] == "the word 'the'"

    # The rater finishes: every other feature gets all points, every other neuron 1 per criterion.
    key = json.loads((page.parent / KEY_FILE).read_text())
    saved = r["saved"]
    for uid in r["ids"][3:]:
        full = key["units"][uid]["kind"] == "feature"
        saved["ratings"][uid] = {x["key"]: x["max"] if full else 1 for x in RUBRIC}
    path = tmp_path / "ratings.json"
    path.write_text(json.dumps(saved))
    summary = summarize_ratings(page.parent, path)
    assert summary["rated"] == 7 and summary["partial"] == 1 and summary["unrated"] == 0
    expect = {"feature": [], "neuron": []}  # by hand, from the key
    for uid in r["ids"]:
        kind = key["units"][uid]["kind"]
        if uid == a:
            expect[kind].append(10)
        elif uid == b:
            expect[kind].append(0)
        elif uid != c:
            expect[kind].append(MAX_TOTAL if kind == "feature" else len(RUBRIC))
    got = summary["members"][MEMBER]
    assert got["features"]["n"] == len(expect["feature"])
    assert got["features"]["mean"] == pytest.approx(sum(expect["feature"]) / len(expect["feature"]))
    assert got["neurons"]["mean"] == pytest.approx(sum(expect["neuron"]) / len(expect["neuron"]))
    assert (page.parent / f"hist_ratings_{MEMBER}.png").stat().st_size > 0
    assert "| features mean" in (page.parent / "ratings_summary.md").read_text()


def test_bad_ratings_files_name_the_setting(tmp_path, page):
    key = json.loads((page.parent / KEY_FILE).read_text())
    uid = next(iter(key["units"]))
    good = {x["key"]: 1 for x in RUBRIC}
    cases = [
        (None, "no such file"),
        ("not json", "is not JSON"),
        ({"page": key["page"]}, "no 'ratings' object"),
        ({"page": "0123456789ab", "ratings": {}}, "rates page '0123456789ab'"),
        ({"page": key["page"], "ratings": {"u999zzzz": good}}, "u999zzzz"),
        ({"page": key["page"], "ratings": {uid: {**good, "confidence": 9}}}, "confidence=9"),
    ]
    for i, (content, named) in enumerate(cases):
        path = tmp_path / f"bad_{i}.json"
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ConfigError) as err:
            summarize_ratings(page.parent, path)
        assert "interp.ratings=" in str(err.value) and named in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    assert not (page.parent / "ratings_summary.json").exists()  # nothing written on bad input
