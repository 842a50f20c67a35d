"""`dsae-interp`: explain and score each member's sampled features, and the neurons of the same
layer as the baseline (the seed paper's features-vs-neurons comparison), with one LLM client.

Per member (out_dir/train/<member>): interp.features of the features that fire on the scanned
held-out rows; per layer, once for every member of that layer: interp.neurons MLP neurons
(blocks.L.mlp.hook_post; from the store if harvested, else from a forward pass of the model)
and, where a member reads the residual stream, as many of its basis directions. Every unit's
explanation is written from its example windows, then scored on others (interp/examples.py).

Writes out_dir/interp/: <member>.json and baseline_<layer>_<kind>.json (one record per unit:
explanation, scores, example counts), summary.json / summary.md (score distributions, the
neuron baselines, mean score by width) and hist_<member>.png (features vs neurons); each
explained feature also gets an `interp` entry in eval/<member>/features.json (and the member's
dashboard is rebuilt with it); rate.html / rate_key.json are the blind rating page
(interp/rating.py). With interp.ratings=<file> the stage only summarises a person's ratings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distributed_sae.config import ConfigError, RunConfig, parse_hook
from distributed_sae.interp.examples import (
    Split, UnitActs, dense_acts, firing_counts, sample_units, token_texts, top_tokens,
    unit_examples, window_rows)
from distributed_sae.interp.report import write_json, write_results, write_summary
from distributed_sae.store import ActivationStore, split_rows

log = logging.getLogger(__name__)
RESID_KINDS = ("hook_resid_pre", "hook_resid_post")


def scanned_rows(cfg: RunConfig, store: ActivationStore) -> range:
    """Whole contexts from the start of the held-out part, interp.tokens of them at most."""
    _, held = split_rows(store, cfg.train.holdout_fraction)
    cs = store.context_size
    start = -(-held.start // cs) * cs  # the held-out cut is a chunk's, not always a context's
    n = (held.stop - start) // cs * cs
    if cfg.interp.tokens:
        n = min(n, cfg.interp.tokens // cs * cs)
    if n <= 0:
        raise ConfigError(f"interp.tokens={cfg.interp.tokens} leaves no whole context of "
                          f"{cs} tokens in the held-out rows {held.start}..{held.stop}: raise "
                          f"interp.tokens or train.holdout_fraction")
    return range(start, start + n)


def _members(cfg: RunConfig) -> list[Path]:
    from distributed_sae.eval.run import trained_members

    folders = trained_members(cfg.out_dir)
    if not cfg.interp.members:
        return folders
    names = {f.name: f for f in folders}
    missing = [m for m in cfg.interp.members if m not in names]
    if missing:
        raise ConfigError(f"interp.members names {missing}, not trained in {cfg.out_dir}/train: "
                          f"choose from {sorted(names)}")
    return [names[m] for m in cfg.interp.members]


def feature_units(cfg: RunConfig, store: ActivationStore, rows: range, sae: Any, hook: str,
                  unembed: torch.Tensor | None, text: Any) -> UnitActs:
    """interp.features of the member's features that fire on `rows` (seeded sample)."""
    fired = firing_counts(store, hook, rows, sae.encode)
    rng = np.random.default_rng([cfg.interp.seed, 1])
    cols = sample_units(np.flatnonzero(fired.numpy() > 0), cfg.interp.features, rng)
    idx = torch.as_tensor(cols, dtype=torch.long)
    acts = dense_acts(store, hook, rows, lambda x: sae.encode(x.to(sae.W_dec.dtype))[:, idx])
    promoted = [[] for _ in cols]
    if unembed is not None and cols:  # eval's direct logit effects of the decoder rows
        from distributed_sae.eval.features import logit_effects

        ids = logit_effects(sae, unembed, 10, cols)[1]  # (U, 10) top token ids
        promoted = [[text(int(i)) for i in row] for row in ids]
    return UnitActs("feature", cols, acts, promoted)


def _mlp_acts(cfg: RunConfig, store: ActivationStore, rows: range, loaded: Any, hook: str,
              idx: torch.Tensor) -> torch.Tensor:
    """(rows, U) MLP neuron activations, from a forward pass over the scanned contexts."""
    from distributed_sae.models.hooks import run_with_hooks

    cs = store.context_size
    ids = torch.from_numpy(np.asarray(store.tokens(rows.start, rows.stop), dtype=np.int64))
    ids = ids.view(-1, cs)  # (n_ctx, cs)
    excluded = np.asarray(store.metadata.get("exclude_token_ids", []), dtype=np.int64)
    parts = []
    for a in tqdm(range(0, len(ids), 8), desc=f"interp {hook}", unit="batch", leave=False):
        out = run_with_hooks(loaded, ids[a:a + 8].to(loaded.device), [hook])[hook]
        parts.append(out.float().cpu().reshape(-1, out.shape[-1])[:, idx])  # (8 cs, U)
    acts = torch.cat(parts).clamp_min(0.0)
    acts[torch.from_numpy(np.isin(ids.reshape(-1).numpy(), excluded))] = 0.0
    return acts


def baseline_units(cfg: RunConfig, store: ActivationStore, rows: range, loaded: Any, layer: int,
                   kind: str, resid_hook: str | None, text: Any) -> UnitActs:
    """interp.neurons MLP neurons of `layer` (kind 'neuron') or residual basis directions of
    resid_hook (kind 'resid'), a seeded sample, with their direct logit effects."""
    from distributed_sae.eval.features import unembedding

    hook = f"blocks.{layer}.mlp.hook_post" if kind == "neuron" else resid_hook
    assert hook is not None
    width = loaded.d_mlp if kind == "neuron" else loaded.d_model
    rng = np.random.default_rng([cfg.interp.seed, 2 if kind == "neuron" else 3, layer])
    cols = sample_units(np.arange(width), cfg.interp.neurons, rng)
    idx = torch.as_tensor(cols, dtype=torch.long)
    if hook in store.hook_points:  # harvested: read it like a member's input
        acts = dense_acts(store, hook, rows, lambda x: x[:, idx])
    else:
        acts = _mlp_acts(cfg, store, rows, loaded, hook, idx)
    try:
        logits = unembedding(loaded, hook)[idx]  # (U, vocab)
    except ValueError:  # no LM head (an encoder): explanations go without promoted tokens
        logits = torch.zeros(len(cols), 0)
    return UnitActs(kind, cols, acts, top_tokens(logits, text))


def explain_and_score(llm: Any, cfg: RunConfig, units: UnitActs, windows: torch.Tensor,
                      texts: list[str]) -> tuple[list[dict[str, Any]], list[Any]]:
    """One record per unit (its explanation, every scorer's score and its example counts), and
    each unit's UnitExamples (what the rating page shows)."""
    from distributed_sae.interp.scoring import explain_all, score_all

    i = cfg.interp
    split = Split(i.explain_top, i.explain_quantile, i.score_active, i.score_inactive)
    examples = unit_examples(units, windows, texts, split, i.seed)
    explanations = explain_all(llm, examples)
    scores = score_all(llm, examples, explanations, i.scorers, seed=i.seed)
    for rec, u, index in zip(scores, examples, units.indices):
        rec.update(kind=units.kind, index=index, n_explain=len(u.explain),
                   n_active=len(u.score_pos), n_inactive=len(u.score_neg))
    return scores, examples


def make_llm(cfg: RunConfig) -> Any:
    """The LLM client of interp.*: the backend checked (reachable, key, model) before any work."""
    from distributed_sae.interp.llm import LLM, make_backend

    i = cfg.interp
    backend = make_backend(i.backend, i.model, i.base_url, i.api_key_env, i.timeout_s,
                           device=i.device)
    if hasattr(backend, "check"):
        backend.check()
    return LLM(backend, Path(i.cache_dir), concurrency=i.concurrency, max_retries=i.max_retries,
               requests_per_minute=i.requests_per_minute,
               cost_per_1k_prompt=i.cost_per_1k_prompt,
               cost_per_1k_completion=i.cost_per_1k_completion)


def run_interp(cfg: RunConfig) -> dict[str, Any]:
    """The stage: see the module docstring. Returns the summary."""
    from distributed_sae.eval.features import _TokenText, unembedding
    from distributed_sae.eval.replacement import member_io
    from distributed_sae.models import load_model
    from distributed_sae.sae import load_sae

    out = Path(cfg.out_dir) / "interp"
    if cfg.interp.ratings:  # a person's ratings: no model, no LLM
        from distributed_sae.interp.rating import summarize_ratings

        return summarize_ratings(out, cfg.interp.ratings)
    store = ActivationStore.open(cfg.store.path)
    folders = _members(cfg)
    llm = make_llm(cfg)
    rows = scanned_rows(cfg, store)
    loaded = load_model(cfg.model)
    text = _TokenText(loaded.tokenizer)
    texts = token_texts(store, rows, text)
    windows = window_rows(len(rows), store.context_size, cfg.interp.window)
    out.mkdir(parents=True, exist_ok=True)
    members, baselines, rated = {}, {}, {}
    for folder in tqdm(folders, desc="interp", unit="member", disable=len(folders) < 2):
        sae, sae_cfg = load_sae(folder)
        inputs, targets = member_io(sae_cfg)
        if len(inputs) != 1:
            log.warning("interp: skipping %s: it reads %d hooks (a crosscoder); features of "
                        "one-hook members only", folder.name, len(inputs))
            continue
        hook = inputs[0]
        layer, kind = parse_hook(hook)
        try:
            unembed = unembedding(loaded, targets[0])
        except ValueError:
            unembed = None
        feats = feature_units(cfg, store, rows, sae, hook, unembed, text)
        records, rated[folder.name] = explain_and_score(llm, cfg, feats, windows, texts)
        rated[folder.name] = ("feature", feats.indices, rated[folder.name])
        wanted = [("neuron", None)] + ([("resid", hook)] if kind in RESID_KINDS else [])
        names = []
        for bkind, resid in wanted if cfg.interp.neurons else []:
            key = f"baseline_{layer}_{bkind}" + (f"_{kind}" if resid else "")
            if key not in baselines:
                units = baseline_units(cfg, store, rows, loaded, layer, bkind, resid, text)
                baselines[key], examples = explain_and_score(llm, cfg, units, windows, texts)
                if bkind == "neuron":
                    rated[key] = (bkind, units.indices, examples)
                write_results(out / f"{key}.json", key, hook, baselines[key])
            names.append(key)
        members[folder.name] = {"hook": hook, "d_sae": sae.d_sae, "kind": sae.kind,
                                "baselines": names, "units": records}
        write_results(out / f"{folder.name}.json", folder.name, hook, records)
        _annotate_features(Path(cfg.out_dir) / "eval", folder.name, records)
    if cfg.interp.rate_units and rated:
        from distributed_sae.interp.rating import write_rating_page

        page = write_rating_page(out, rated, members, cfg.interp.rate_units, cfg.interp.seed)
        log.info("blind rating page: %s (rate it, then dsae-interp interp.ratings=<saved file>)",
                 page)
    return write_summary(out, members, baselines, llm.usage.as_dict(), cfg.interp.scorers,
                         f"{cfg.interp.backend}:{cfg.interp.model}")


def _annotate_features(eval_dir: Path, member: str, records: list[dict[str, Any]]) -> None:
    """Add each explained feature's explanation and scores to eval's features.json (if there),
    written atomically (temp file, fsync, rename), and rebuild the member's dashboard with them."""
    from distributed_sae.eval.dashboard import refresh_dashboard

    path = eval_dir / member / "features.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    by_index = {r["index"]: r for r in records}
    for entry in report.get("features", []):
        rec = by_index.get(entry.get("index"))
        if rec is not None:
            entry["interp"] = {k: v for k, v in rec.items()
                               if k not in ("unit", "kind", "index")}
    write_json(path, report, indent=None)  # as eval wrote it: compact (it grows with d_sae)
    refresh_dashboard(eval_dir, member)
