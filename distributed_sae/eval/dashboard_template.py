"""The static HTML of a feature dashboard: page skeleton, CSS and the JS that renders features.

Kept as Python strings so the package needs no data files. dashboard.py fills the __DSAE_*__
placeholders (plain str.replace: the JS uses `$` and braces freely). The JS builds every element
with createElement/textContent, never innerHTML with data, so token text such as `</script>`,
`<b>` or `&amp;` shows literally and cannot inject markup.
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__DSAE_TITLE__</title>
<style>__DSAE_CSS__</style>
</head>
<body>
<header><h1>__DSAE_TITLE__</h1><p class="sub">__DSAE_SUBTITLE__</p></header>
<main>
<section id="summary"><h2>Summary</h2>__DSAE_METRICS__</section>
<section id="plots">__DSAE_PLOTS__</section>
<section id="features-section">
<h2>Features</h2>
<div id="controls">
  <input id="search" type="search" placeholder="feature index (e.g. 12) or token text"
         aria-label="search features" size="34">
  <label><input id="hide-dead" type="checkbox" checked> hide dead</label>
  <label>sort <select id="sort">
    <option value="index">index</option>
    <option value="density-desc">density, high first</option>
    <option value="density-asc">density, low first</option>
    <option value="max-desc">max activation</option>
    <option value="detection-desc">detection score</option>
    <option value="fuzzing-desc">fuzzing score</option>
    <option value="simulation-desc">simulation score</option>
  </select></label>
  <label><input id="explained-only" type="checkbox"> explained only</label>
  <label>per page <select id="page-size">
    <option>10</option><option selected>20</option><option>50</option><option>100</option>
  </select></label>
  <button id="prev" type="button">&larr; prev</button>
  <span id="page-info"></span>
  <button id="next" type="button">next &rarr;</button>
</div>
<div id="features"></div>
</section>
</main>
<script type="application/json" id="dsae-data">__DSAE_DATA__</script>
<script>__DSAE_JS__</script>
</body>
</html>
"""

# Page frame shared with the blind rating page (interp/rating_template.py).
BASE_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1d1d1f; background: #f6f6f8; }
header { background: #23283b; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; } .sub { margin: 4px 0 0; color: #c9cce0; }
.ctx { font: 12.5px/1.9 ui-monospace, "SFMono-Regular", Menlo, monospace; margin: 2px 0;
       padding: 2px 4px; border-bottom: 1px dotted #eee; overflow-wrap: anywhere; }
.tok { white-space: pre; border-radius: 2px; }
.empty { color: #777; font-style: italic; }
"""

CSS = BASE_CSS + """
main { padding: 12px 24px 40px; max-width: 1200px; }
h2 { font-size: 17px; margin: 20px 0 8px; }
table.metrics { border-collapse: collapse; background: #fff; }
table.metrics td, table.metrics th { border: 1px solid #ddd; padding: 3px 10px; text-align: left; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
#plots figure { display: inline-block; margin: 8px 12px 8px 0; background: #fff; padding: 6px;
                border: 1px solid #ddd; } #plots img { max-width: 100%; display: block; }
#plots figcaption { font-size: 12px; color: #555; }
#controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 10px; }
#page-info { color: #444; min-width: 14em; text-align: center; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 10px 0;
        padding: 10px 14px; }
.card.dead { opacity: 0.7; } .card h3 { margin: 0 0 4px; font-size: 15px; }
.card h3 a { color: inherit; text-decoration: none; }
.stats { color: #555; font-size: 12px; margin-bottom: 6px; }
.ctx .val { color: #777; display: inline-block; min-width: 5.5em; }
.tok.focus { outline: 1.5px solid #c0392b; }
.special { color: #999; }
.logits { display: flex; gap: 24px; flex-wrap: wrap; margin-top: 6px; font-size: 12.5px; }
.logits h4 { margin: 2px 0; font-size: 12px; color: #555; }
.logit { display: inline-block; margin: 1px 3px; padding: 0 4px; border-radius: 3px;
         font-family: ui-monospace, Menlo, monospace; white-space: pre; }
.pos { background: #dcefff; } .neg { background: #ffe0dc; }
.interp { margin: 4px 0 6px; padding: 4px 8px; background: #f1f6ee; border-left: 3px solid #6a9f6a; }
.interp .scores { color: #555; font-size: 12px; }
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("dsae-data").textContent);
  var feats = (data.features && data.features.features) || [];
  var byIndex = {};
  feats.forEach(function (f) { byIndex[f.index] = f; });
  var state = { query: "", hideDead: true, explainedOnly: false, sort: "index", page: 0, size: 20 };
  var SCORERS = ["detection", "fuzzing", "simulation"];
  var haystack = null;  // lower-cased token text per feature, built on the first text search

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function isDead(f) { return !(f.density > 0); }
  function num(x, digits) {
    return (typeof x === "number" && isFinite(x)) ? x.toPrecision(digits || 3) : "n/a";
  }
  function maxAct(f) {
    var q = f.quantiles || {};
    if (typeof q.max === "number" && q.max > 0) return q.max;
    var m = 0;
    (f.top_contexts || []).forEach(function (c) { m = Math.max(m, c.activation || 0); });
    return m;
  }
  // Whitespace and control characters are made visible; the text still goes in via textContent.
  function visible(tok) {
    return String(tok).replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function buildHaystack() {
    haystack = feats.map(function (f) {
      var parts = [];
      (f.top_contexts || []).forEach(function (c) { parts.push((c.tokens || []).join("")); });
      (f.logits_top || []).concat(f.logits_bottom || []).forEach(function (p) { parts.push(p[0]); });
      if (f.interp && f.interp.explanation) parts.push(f.interp.explanation);
      return parts.join("\u0000").toLowerCase();
    });
  }
  function sortKey(f) {
    if (state.sort === "density-desc") return -(f.density || 0);
    if (state.sort === "density-asc") return f.density || 0;
    if (state.sort === "max-desc") return -maxAct(f);
    var scorer = state.sort.replace("-desc", "");
    if (SCORERS.indexOf(scorer) >= 0) {  // unscored features last
      var v = f.interp && f.interp[scorer];
      return (typeof v === "number" && isFinite(v)) ? -v : Infinity;
    }
    return f.index;
  }
  function matching() {
    var q = state.query.trim();
    var out = [], exact = null;
    var asIndex = /^#?\d+$/.test(q) ? parseInt(q.replace("#", ""), 10) : null;
    if (asIndex !== null && byIndex[asIndex]) exact = byIndex[asIndex];  // shown even if dead
    var needle = q.toLowerCase();
    if (needle && haystack === null) buildHaystack();
    feats.forEach(function (f, i) {
      if (f === exact) return;
      if (state.hideDead && isDead(f)) return;
      if (state.explainedOnly && !f.interp) return;
      if (needle && haystack[i].indexOf(needle) < 0) return;
      out.push(f);
    });
    out.sort(function (a, b) {
      var ka = sortKey(a), kb = sortKey(b);
      return (ka === kb ? 0 : (ka < kb ? -1 : 1)) || a.index - b.index;  // Infinity-safe
    });
    return exact ? [exact].concat(out) : out;
  }
  function tokenSpan(tok, act, scale, focus) {
    var span = el("span", "tok" + (focus ? " focus" : ""), visible(tok));
    var a = scale > 0 ? Math.max(0, Math.min(1, act / scale)) : 0;
    if (a > 0) span.style.backgroundColor = "rgba(255, 140, 0, " + (0.1 + 0.8 * a).toFixed(3) + ")";
    span.title = "activation " + num(act, 4);
    return span;
  }
  function contextRow(ctx, scale) {
    var row = el("div", "ctx");
    row.appendChild(el("span", "val", num(ctx.activation, 3)));
    var toks = ctx.tokens || [], acts = ctx.acts || [];
    for (var i = 0; i < toks.length; i++) {
      row.appendChild(tokenSpan(toks[i], acts[i] || 0, scale, i === ctx.focus));
    }
    return row;
  }
  function logitList(title, pairs, cls) {
    var box = el("div");
    box.appendChild(el("h4", null, title));
    if (!pairs || !pairs.length) box.appendChild(el("span", "empty", "none"));
    (pairs || []).forEach(function (p) {
      var s = el("span", "logit " + cls, visible(p[0]));
      s.title = "logit effect " + num(p[1], 4);
      box.appendChild(s);
    });
    return box;
  }
  function interpBox(it) {
    var box = el("div", "interp");
    box.appendChild(el("div", "explanation", it.explanation || "(no explanation)"));
    var parts = SCORERS.filter(function (s) { return s in it; }).map(function (s) {
      return s + " " + num(it[s], 3);
    });
    box.appendChild(el("div", "scores", "LLM explanation \u00b7 " + parts.join(", ")));
    return box;
  }
  function card(f) {
    var c = el("article", "card" + (isDead(f) ? " dead" : ""));
    c.id = "f" + f.index;
    c.setAttribute("data-index", f.index);
    var h = el("h3"), a = el("a", null, "Feature #" + f.index + (isDead(f) ? " (dead)" : ""));
    a.href = "#f" + f.index;
    h.appendChild(a);
    c.appendChild(h);
    var q = f.quantiles || {};
    c.appendChild(el("div", "stats", "density " + num(f.density, 3) + " (log10 " +
      num(f.log10_density, 3) + ")  \u00b7  activation quantiles: p50 " + num(q["0.5"]) +
      ", p90 " + num(q["0.9"]) + ", p99 " + num(q["0.99"]) + ", max " + num(q.max)));
    if (f.interp) c.appendChild(interpBox(f.interp));
    var ctxs = f.top_contexts || [], scale = maxAct(f);
    if (!ctxs.length) c.appendChild(el("div", "empty", "no activating contexts"));
    ctxs.forEach(function (ctx) { c.appendChild(contextRow(ctx, scale)); });
    var logits = el("div", "logits");
    logits.appendChild(logitList("promotes (top logits)", f.logits_top, "pos"));
    logits.appendChild(logitList("suppresses (bottom logits)", f.logits_bottom, "neg"));
    c.appendChild(logits);
    return c;
  }
  function render() {
    var list = document.getElementById("features");
    while (list.firstChild) list.removeChild(list.firstChild);
    if (!feats.length) {
      list.appendChild(el("p", "empty", "No feature data: features.json was not produced."));
      document.getElementById("page-info").textContent = "";
      return;
    }
    var hits = matching();
    var pages = Math.max(1, Math.ceil(hits.length / state.size));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * state.size;
    hits.slice(start, start + state.size).forEach(function (f) { list.appendChild(card(f)); });
    if (!hits.length) list.appendChild(el("p", "empty", "No feature matches."));
    var dead = feats.filter(isDead).length;
    document.getElementById("page-info").textContent = "page " + (state.page + 1) + " of " +
      pages + " \u00b7 " + hits.length + " of " + feats.length + " features (" + dead + " dead)";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
  }
  function fromHash() {
    var m = /^#f(\d+)$/.exec(window.location.hash);
    if (!m) return;
    document.getElementById("search").value = m[1];
    state.query = m[1];
    state.page = 0;
  }
  var timer = null;
  document.getElementById("search").addEventListener("input", function (e) {
    clearTimeout(timer);  // debounced: a text search scans every feature's contexts
    timer = setTimeout(function () { state.query = e.target.value; state.page = 0; render(); }, 120);
  });
  document.getElementById("hide-dead").addEventListener("change", function (e) {
    state.hideDead = e.target.checked; state.page = 0; render();
  });
  document.getElementById("explained-only").addEventListener("change", function (e) {
    state.explainedOnly = e.target.checked; state.page = 0; render();
  });
  document.getElementById("sort").addEventListener("change", function (e) {
    state.sort = e.target.value; state.page = 0; render();
  });
  document.getElementById("page-size").addEventListener("change", function (e) {
    state.size = parseInt(e.target.value, 10) || 20; state.page = 0; render();
  });
  document.getElementById("prev").addEventListener("click", function () { state.page--; render(); });
  document.getElementById("next").addEventListener("click", function () { state.page++; render(); });
  window.addEventListener("hashchange", function () { fromHash(); render(); });
  // A hook for scripted use (and the browser test): search synchronously, get the page's cards.
  window.dsaeDashboard = {
    search: function (q) {
      document.getElementById("search").value = q; state.query = q; state.page = 0; render();
      return document.querySelectorAll("#features .card").length;
    },
    setHideDead: function (v) {
      document.getElementById("hide-dead").checked = v; state.hideDead = v; render();
    },
    nFeatures: feats.length
  };
  fromHash();
  render();
})();
"""
