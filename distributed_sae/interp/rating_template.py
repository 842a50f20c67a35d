"""The static HTML of the blind rating page (interp/rating.py fills it).

One self-contained file: CSS and JS inline, the units as JSON in a <script type=
"application/json">, no network. Units are shown one card each, in a shuffled order, under
opaque ids: the page holds no kind (feature or neuron), no index and no member name; the key
that maps ids back stays beside it in rate_key.json, which the rater never needs to open.
Ratings persist in localStorage (keyed by the page id) as they are made, and "Save ratings"
downloads them as ratings_<page>.json for `dsae-interp interp.ratings=<file>`. As in the
dashboard, every element is built with createElement/textContent: token text cannot inject
markup.
"""

from distributed_sae.eval.dashboard_template import BASE_CSS

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Blind interpretability rating</title>
<style>__DSAE_CSS__</style>
</head>
<body>
<header><h1>Blind interpretability rating</h1>
<p class="sub">page __DSAE_PAGE__ &middot; <span id="progress"></span></p></header>
<main>
<section id="how">
<p>Each card is one unit of the model, shown by the windows of text on which it is most active
(darker = more active) and the tokens it promotes. Units come in a random order and carry no
label. For each, write what you think it responds to, then score it on the four criteria of
the rubric (a unit with no interpretation scores 0 on all). Ratings are kept in this browser as
you go; press <b>Save ratings</b> to download them, and give the file to
<code>dsae-interp interp.ratings=&lt;file&gt;</code>.</p>
<ul id="rubric"></ul>
<label>rater <input id="rater" type="text" size="20" placeholder="your name (optional)"></label>
<button id="save" type="button">Save ratings</button>
</section>
<section id="units"></section>
</main>
<script type="application/json" id="dsae-rating">__DSAE_DATA__</script>
<script>__DSAE_JS__</script>
</body>
</html>
"""

CSS = BASE_CSS + """
main { padding: 12px 24px 40px; max-width: 1100px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 12px 0;
        padding: 10px 14px; } .card.done { border-color: #6a9f6a; }
.card h3 { margin: 0 0 6px; font-size: 15px; }
.logit { display: inline-block; margin: 1px 3px; padding: 0 4px; border-radius: 3px;
         font-family: ui-monospace, Menlo, monospace; white-space: pre; background: #dcefff; }
.crit { margin: 4px 0; } .crit span.name { display: inline-block; min-width: 16em; }
.crit label { margin-right: 8px; }
textarea { width: 100%; max-width: 60em; }
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("dsae-rating").textContent);
  var storeKey = "dsae-rating-" + data.page;
  var saved = {};
  try { saved = JSON.parse(window.localStorage.getItem(storeKey) || "{}"); } catch (e) { saved = {}; }
  var ratings = saved.ratings || {};
  if (saved.rater) document.getElementById("rater").value = saved.rater;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function visible(tok) {
    return String(tok).replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function persist() {
    try {
      window.localStorage.setItem(storeKey, JSON.stringify(
        { ratings: ratings, rater: document.getElementById("rater").value }));
    } catch (e) { /* private mode: the download still works */ }
    progress();
  }
  function complete(r) {
    return !!r && data.rubric.every(function (c) { return typeof r[c.key] === "number"; });
  }
  function progress() {
    var done = data.units.filter(function (u) { return complete(ratings[u.id]); }).length;
    document.getElementById("progress").textContent = done + " of " + data.units.length + " rated";
    data.units.forEach(function (u) {
      var c = document.getElementById("u-" + u.id);
      if (c) c.className = "card" + (complete(ratings[u.id]) ? " done" : "");
    });
  }
  function setScore(id, key, value) {
    ratings[id] = ratings[id] || {};
    ratings[id][key] = value;
    var radio = document.getElementById("r-" + id + "-" + key + "-" + value);
    if (radio) radio.checked = true;
    persist();
  }
  function context(ex, scale) {
    var row = el("div", "ctx");
    for (var i = 0; i < ex.tokens.length; i++) {
      var span = el("span", "tok", visible(ex.tokens[i]));
      var a = scale > 0 ? Math.max(0, Math.min(1, (ex.acts[i] || 0) / scale)) : 0;
      if (a > 0) span.style.backgroundColor = "rgba(255, 140, 0, " + (0.1 + 0.8 * a).toFixed(3) + ")";
      row.appendChild(span);
    }
    return row;
  }
  function criterion(u, c) {
    var box = el("div", "crit");
    box.appendChild(el("span", "name", c.label + " (0-" + c.max + ")"));
    for (var v = 0; v <= c.max; v++) {
      var lab = el("label"), radio = el("input");
      radio.type = "radio"; radio.name = "r-" + u.id + "-" + c.key; radio.value = v;
      radio.id = "r-" + u.id + "-" + c.key + "-" + v;
      radio.checked = !!ratings[u.id] && ratings[u.id][c.key] === v;
      radio.addEventListener("change", (function (val) {
        return function () { setScore(u.id, c.key, val); };
      })(v));
      lab.appendChild(radio); lab.appendChild(document.createTextNode(" " + v));
      box.appendChild(lab);
    }
    return box;
  }
  function card(u, n) {
    var c = el("article", "card");
    c.id = "u-" + u.id;
    c.appendChild(el("h3", null, "Unit " + (n + 1) + " of " + data.units.length + " (" + u.id + ")"));
    var scale = 0;
    u.examples.forEach(function (ex) { ex.acts.forEach(function (a) { scale = Math.max(scale, a); }); });
    if (!u.examples.length) c.appendChild(el("div", "empty", "no activating windows"));
    u.examples.forEach(function (ex) { c.appendChild(context(ex, scale)); });
    var logits = el("div");
    logits.appendChild(el("b", null, "promotes: "));
    if (!u.logits_top.length) logits.appendChild(el("span", "empty", "none"));
    u.logits_top.forEach(function (t) { logits.appendChild(el("span", "logit", visible(t))); });
    c.appendChild(logits);
    var text = el("textarea");
    text.rows = 2; text.placeholder = "your interpretation"; text.id = "t-" + u.id;
    text.value = (ratings[u.id] && ratings[u.id].interpretation) || "";
    text.addEventListener("input", function () {
      ratings[u.id] = ratings[u.id] || {}; ratings[u.id].interpretation = text.value; persist();
    });
    c.appendChild(text);
    data.rubric.forEach(function (crit) { c.appendChild(criterion(u, crit)); });
    var none = el("button", null, "no interpretation (all 0)");
    none.type = "button";
    none.addEventListener("click", function () {
      data.rubric.forEach(function (crit) { setScore(u.id, crit.key, 0); });
    });
    c.appendChild(none);
    return c;
  }
  function ratingsJSON() {
    var out = {};
    Object.keys(ratings).forEach(function (id) { out[id] = ratings[id]; });
    return JSON.stringify({ page: data.page, rater: document.getElementById("rater").value,
                            rubric: data.rubric, ratings: out }, null, 1);
  }
  function save() {
    var blob = new Blob([ratingsJSON()], { type: "application/json" });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "ratings_" + data.page + ".json";
    document.body.appendChild(a); a.click(); a.remove();
  }
  var list = document.getElementById("units");
  data.units.forEach(function (u, n) { list.appendChild(card(u, n)); });
  var rubric = document.getElementById("rubric");
  data.rubric.forEach(function (c) { rubric.appendChild(el("li", null, c.label + " (0-" + c.max + "): " + c.help)); });
  document.getElementById("rater").addEventListener("input", persist);
  document.getElementById("save").addEventListener("click", save);
  // For scripted use (and the browser test): rate without clicking, read what Save would write.
  window.dsaeRating = { setScore: setScore, ratingsJSON: ratingsJSON, nUnits: data.units.length };
  progress();
})();
"""
