"""Static HTML feature dashboards: one self-contained page per SAE, and an index over the bank.

A page opens from disk with no server and no network: CSS and JS are inline, plots are base64
data URIs, and the features (features.json, see below) ride along as JSON in a
<script type="application/json"> that the page's JS renders a page of cards at a time, so a
dictionary of 100k features stays responsive.

features.json schema (written by the feature-harvest step of the eval stage):
    {"member", "hook", "d_sae", "n_tokens",
     "features": [{"index", "density", "log10_density",
                   "quantiles": {"0.5", "0.9", "0.99", "max"},
                   "top_contexts": [{"activation", "tokens": [str], "acts": [float], "focus"}],
                   "logits_top": [[str, float]], "logits_bottom": [[str, float]]}]}
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping

from distributed_sae.eval import dashboard_template as tpl

log = logging.getLogger(__name__)

DASHBOARD_FILE = "dashboard.html"
INDEX_FILE = "index.html"
FEATURES_FILE = "features.json"
# Metrics shown in the summary table, in this order, when present.
METRIC_ROWS = (
    ("n_tokens", "evaluation tokens"), ("training_tokens", "training tokens"),
    ("d_sae", "latents (d_sae)"), ("l0", "L0 (active latents per token)"),
    ("fvu", "FVU (fraction of variance unexplained)"), ("explained_variance", "explained variance"),
    ("mse", "MSE"), ("dead_fraction", "dead fraction"), ("dense_fraction", "dense fraction (>10%)"),
    ("loss_recovered", "fraction of CE loss recovered"), ("ce_clean", "CE loss, clean"),
    ("ce_spliced", "CE loss, SAE spliced in"), ("ce_zero", "CE loss, hook zero-ablated"),
    ("kl_div", "KL(clean || spliced)"),
)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (JSON.parse rejects the NaN json.dumps writes)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def embed_json(data: Any) -> str:
    """JSON for a <script> element: '<', '>' and '&' escaped as \\u00XX so no token text (e.g.
    '</script>' or '<!--') can end the element early; JSON.parse reads the escapes back."""
    try:  # fast path; walking a large features dict to clean it costs more than dumping it
        text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_clean(data), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _compact(features: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of features.json with per-token activations cut to 3 significant digits: they
    only colour the tokens, and full float reprs would make up most of the page's size."""
    def context(ctx: Mapping[str, Any]) -> dict[str, Any]:
        return {**ctx, "acts": [float(f"{a:.3g}") for a in ctx.get("acts") or ()]}

    feats = [{**f, "top_contexts": [context(c) for c in f.get("top_contexts") or ()]}
             for f in features["features"]]
    return {**features, "features": feats}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = [f"<tr><th>{html.escape(label)}</th><td class=\"num\">{html.escape(_fmt(metrics[key]))}"
            "</td></tr>" for key, label in METRIC_ROWS if metrics.get(key) is not None]
    if not rows:
        return '<p class="empty">no metrics</p>'
    return '<table class="metrics">' + "".join(rows) + "</table>"


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _plots_html(plots: Mapping[str, str | Path] | None) -> str:
    figures = []
    for name, path in (plots or {}).items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"plot {name!r} points at {path}, which does not exist")
        figures.append(f'<figure><img alt="{html.escape(name)}" src="{_data_uri(Path(path))}">'
                       f"<figcaption>{html.escape(name)}</figcaption></figure>")
    return "".join(figures)


def load_features(features: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """features.json as a dict (a path is read), checked against the schema's required keys."""
    if not isinstance(features, Mapping):
        path = Path(features)
        if not path.is_file():
            raise FileNotFoundError(f"no features file at {path}: run the eval stage's feature "
                                    "harvest first, or pass features=None for a page without them")
        features = json.loads(path.read_text())
    if not isinstance(features.get("features"), list):
        raise ValueError("features must be a dict with a 'features' list (the features.json "
                         f"schema); got keys {sorted(features)}")
    for i, feat in enumerate(features["features"]):
        if not isinstance(feat, Mapping) or not isinstance(feat.get("index"), int):
            raise ValueError(f"features[{i}] has no integer 'index': {str(feat)[:120]}")
    return dict(features)


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """Replace every __DSAE_<NAME>__ of `template` by values[NAME] ('' if absent) in ONE pass,
    so text put in (token strings in the JSON, a title) is never searched for placeholders
    again."""
    return re.sub(r"__DSAE_([A-Z]+)__", lambda m: values.get(m.group(1), ""), template)


def _page(title: str, subtitle: str, body: dict[str, str]) -> str:
    values = {**body, "TITLE": html.escape(title), "SUBTITLE": html.escape(subtitle)}
    return fill_template(tpl.PAGE, values)


def write_dashboard(out: str | Path, metrics: Mapping[str, Any],
                    features: Mapping[str, Any] | str | Path | None = None,
                    plots: Mapping[str, str | Path] | None = None) -> Path:
    """Write one SAE's dashboard to `out` (an .html file, or a folder that gets dashboard.html).

    metrics: the member's metrics.json dict; features: features.json (dict or path) or None for
    a page with metrics and plots only; plots: {caption: PNG path}, embedded as data URIs.
    """
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / DASHBOARD_FILE
    feats = load_features(features) if features is not None else None
    member = str(metrics.get("member") or (feats or {}).get("member") or "SAE")
    if feats and metrics.get("member") and feats.get("member") not in (None, metrics["member"]):
        raise ValueError(f"features are of member {feats['member']!r} but metrics of "
                         f"{metrics['member']!r}: pass the two files of the same member")
    hook = str(metrics.get("hook") or (feats or {}).get("hook") or "")
    d_sae = metrics.get("d_sae") or (feats or {}).get("d_sae")
    subtitle = " · ".join(s for s in (hook, f"{d_sae} latents" if d_sae else "") if s)
    # log10_density is already in the features (and as a plot); the page does not need it twice.
    shown = {k: v for k, v in metrics.items() if k != "log10_density"}
    data = {"member": member, "metrics": shown, "features": _compact(feats) if feats else None}
    page = _page(f"{member} dashboard", subtitle, {
        "METRICS": _metrics_table(metrics), "PLOTS": _plots_html(plots),
        "CSS": tpl.CSS, "JS": tpl.JS, "DATA": embed_json(data)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("wrote dashboard of %s (%d features) to %s", member,
             len(feats["features"]) if feats else 0, out)
    return out


def write_bank_index(out_dir: str | Path, members: Mapping[str, Mapping[str, Any]],
                     frontier: str | Path | None = None) -> Path:
    """Write out_dir/index.html: the bank's metrics, one row per member linking to
    <member>/dashboard.html where that exists, and the frontier plot if given."""
    out_dir = Path(out_dir)
    cols = ("hook", "kind", "d_sae", "l0", "fvu", "loss_recovered", "kl_div", "dead_fraction")
    head = "<tr><th>member</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    rows = []
    for name, m in members.items():
        link = f"{name}/{DASHBOARD_FILE}"
        cell = (f'<a href="{html.escape(link, quote=True)}">{html.escape(name)}</a>'
                if (out_dir / link).is_file() else html.escape(name))
        rows.append(f"<tr><td>{cell}</td>" + "".join(
            f'<td class="num">{html.escape(_fmt(m.get(c))) if m.get(c) is not None else ""}</td>'
            for c in cols) + "</tr>")
    table = f'<table class="metrics">{head}{"".join(rows)}</table>'
    plots = _plots_html({"sparsity-fidelity frontier": frontier} if frontier else None)
    page = _page("SAE bank", f"{len(members)} members", {"METRICS": table, "PLOTS": plots,
                                                         "CSS": tpl.CSS})
    # The bank page has no feature list: drop that section and its (absent) script.
    page = page.split('<section id="features-section">')[0] + "</main>\n</body>\n</html>\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / INDEX_FILE
    out.write_text(page, encoding="utf-8")
    return out


def write_dashboards(eval_dir: str | Path, results: Mapping[str, Mapping[str, Any]]) -> Path:
    """Plots, one dashboard per member and the bank index under `eval_dir`; returns the index.

    Reads eval_dir/<member>/features.json where it exists (members without one get a page of
    metrics and plots). Writes eval_dir/frontier.png, eval_dir/<member>/{density.png,
    dashboard.html} and eval_dir/index.html. Without matplotlib the pages have no plots (logged).
    """
    from distributed_sae.eval import plots as plotting

    eval_dir = Path(eval_dir)
    try:
        plots = plotting.plot_bank(results, eval_dir)
    except ImportError as exc:
        log.warning("dashboards without plots: %s", exc)
        plots = {}
    frontier = plots.get("frontier")
    for name, metrics in results.items():
        page_plots = {"sparsity-fidelity frontier": frontier} if frontier else {}
        if f"density/{name}" in plots:
            page_plots["feature density"] = plots[f"density/{name}"]
        features = eval_dir / name / FEATURES_FILE
        write_dashboard(eval_dir / name / DASHBOARD_FILE, {"member": name, **metrics},
                        features if features.is_file() else None, page_plots)
    return write_bank_index(eval_dir, results, frontier)


def refresh_dashboard(eval_dir: str | Path, member: str) -> Path | None:
    """Rebuild eval_dir/<member>/dashboard.html from the files eval left there (metrics.json,
    features.json, the frontier and density plots), after a later stage (interp) added to
    features.json. None if the member has no metrics (eval did not run)."""
    eval_dir = Path(eval_dir)
    metrics_file = eval_dir / member / "metrics.json"
    if not metrics_file.is_file():
        return None
    from distributed_sae.eval.plots import DENSITY_FILE, FRONTIER_FILE

    plots = {caption: path for caption, path in (
        ("sparsity-fidelity frontier", eval_dir / FRONTIER_FILE),
        ("feature density", eval_dir / member / DENSITY_FILE)) if path.is_file()}
    features = eval_dir / member / FEATURES_FILE
    return write_dashboard(eval_dir / member / DASHBOARD_FILE,
                           {"member": member, **json.loads(metrics_file.read_text())},
                           features if features.is_file() else None, plots)
