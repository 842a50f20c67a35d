"""The eval stage: metrics of every trained member on the held-out tail of the store."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from distributed_sae.config import RunConfig
from distributed_sae.eval.metrics import evaluate_saes
from distributed_sae.sae import load_sae
from distributed_sae.store import ActivationReader, ActivationStore, split_rows

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("fvu", "mse", "l0", "dead_fraction")


def trained_members(out_dir: str | Path) -> list[Path]:
    """Member folders that the train stage wrote under out_dir/train, in bank order."""
    bank = Path(out_dir) / "train" / "bank.json"
    if not bank.is_file():
        raise FileNotFoundError(f"no trained bank at {bank.parent}: run dsae-train out_dir={out_dir} first")
    return [bank.parent / m for m in json.loads(bank.read_text())["members"]]


def evaluate(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Evaluate every member; writes out_dir/eval/<member>/metrics.json and summary.md."""
    store = ActivationStore.open(cfg.store.path)
    _, held_out = split_rows(store, cfg.train.holdout_fraction)
    if cfg.eval.tokens:
        held_out = range(held_out.start, min(held_out.stop, held_out.start + cfg.eval.tokens))
    loaded = [(folder, *load_sae(folder)) for folder in trained_members(cfg.out_dir)]
    by_hook: dict[str, list] = {}
    for item in loaded:
        by_hook.setdefault(item[2]["metadata"]["hook_name"], []).append(item)
    results = {}
    for hook, group in by_hook.items():  # one read of the held-out rows per hook, for the bank
        reader = ActivationReader(store, hook, held_out, cfg.eval.batch_size, shuffle=False,
                                  drop_last=False,
                                  exclude_token_ids=store.metadata["exclude_token_ids"])
        for (folder, sae, sae_cfg), metrics in zip(group, evaluate_saes([g[1] for g in group], reader)):
            metrics.update(member=folder.name, hook=hook, d_sae=sae.d_sae,
                           training_tokens=sae_cfg["metadata"].get("training_tokens"))
            out = Path(cfg.out_dir) / "eval" / folder.name
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            results[folder.name] = metrics
    results = {f.name: results[f.name] for f, _, _ in loaded}  # bank order in the table
    table = summary_table(results)
    (Path(cfg.out_dir) / "eval" / "summary.md").write_text(table + "\n")
    log.info("evaluation on %d held-out tokens:\n%s", len(held_out), table)
    return results


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per member, the headline metrics as columns."""
    head = "| member | d_sae | " + " | ".join(SUMMARY_KEYS) + " |"
    rule = "|" + "---|" * (len(SUMMARY_KEYS) + 2)
    rows = [f"| {name} | {m['d_sae']} | " + " | ".join(f"{m[k]:.4g}" for k in SUMMARY_KEYS) + " |"
            for name, m in results.items()]
    return "\n".join([head, rule, *rows])
