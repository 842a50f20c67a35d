"""The eval stage: every trained member on the held-out tail of the store.

Per member, under out_dir/eval/<member>/: metrics.json (reconstruction and sparsity, plus the
spliced language-model loss when eval.spliced), features.json (top contexts, quantiles, density,
logit effects when eval.features) and dashboard.html, for a crosscoder decoder_norms.json and
.png (each hook's share of every feature's decoder norm, model diffing: eval/diffing.py); for the
bank: summary.md, splitting.json (how features split across widths), universality.json
(activation correlation of members that differ only by seed), frontier.png and index.html. Reads
of the held-out rows and the clean / zero-ablated model passes are shared by the members of one
hook.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from distributed_sae.config import ConfigError, RunConfig
from distributed_sae.config.checks import is_model_b
from distributed_sae.eval.diffing import write_decoder_norms
from distributed_sae.eval.metrics import evaluate_saes
from distributed_sae.sae import SparseAutoencoder, load_sae
from distributed_sae.eval.replacement import member_io
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.store.bank_reader import BankReader, cat_hooks

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("fvu", "mse", "l0", "dead_fraction")
SPLICED_KEYS = ("loss_recovered", "kl_div", "ce_spliced")


def trained_members(out_dir: str | Path) -> list[Path]:
    """Member folders that the train stage wrote under out_dir/train, in bank order."""
    bank = Path(out_dir) / "train" / "bank.json"
    if not bank.is_file():
        raise FileNotFoundError(f"no trained bank at {bank.parent}: run dsae-train out_dir={out_dir} first")
    return [bank.parent / m for m in json.loads(bank.read_text())["members"]]


def _held_out(cfg: RunConfig, store: ActivationStore) -> range:
    _, held_out = split_rows(store, cfg.train.holdout_fraction)
    if cfg.eval.tokens:
        held_out = range(held_out.start, min(held_out.stop, held_out.start + cfg.eval.tokens))
    return held_out


def _outlier_max_norm(group: list[tuple[Path, SparseAutoencoder, dict[str, Any]]]
                      ) -> float | None:
    """The norm above which the members' training dropped rows (train.outlier_norm_ratio), so
    that reconstruction is measured on the rows they were trained for; None if they kept all
    rows or disagree (then every row is measured, and a warning says so)."""
    found = {g[2]["metadata"].get("outlier_max_norm") for g in group}
    if len(found) > 1:
        log.warning("members of one hook were trained with different outlier thresholds %s: "
                    "evaluating them on every held-out row", sorted(map(str, found)))
        return None
    return found.pop()


def evaluate(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Evaluate every member; writes the files of the module docstring and returns the metrics."""
    store = ActivationStore.open(cfg.store.path)
    held_out = _held_out(cfg, store)
    loaded = [(folder, *load_sae(folder)) for folder in trained_members(cfg.out_dir)]
    by_io: dict[tuple[tuple[str, ...], tuple[str, ...]], list] = {}
    for item in loaded:  # members that read and write the same hooks share one read
        by_io.setdefault(member_io(item[2]), []).append(item)
    model = _load_model(cfg, store) if cfg.eval.spliced or cfg.eval.features else None
    eval_dir = Path(cfg.out_dir) / "eval"
    results: dict[str, dict[str, Any]] = {}
    splits: dict[str, Any] = {}
    universal: dict[str, Any] = {}
    # Over members (stderr); the spliced loss and feature passes draw their own bars under it.
    bar = tqdm(total=len(loaded), desc="eval", unit="member", disable=len(loaded) < 2)
    for (inputs, outputs), group in by_io.items():  # one read of the held-out rows per group
        hook = inputs[0]
        max_norm = _outlier_max_norm(group)
        reader = _reader(cfg, store, held_out, inputs, outputs, max_norm)
        saes = [g[1] for g in group]
        spliced = _spliced(cfg, store, model, group, held_out, max_norm)
        metrics_all = evaluate_saes(saes, reader, outputs)
        for i, ((folder, sae, sae_cfg), metrics) in enumerate(zip(group, metrics_all)):
            metrics.update(member=folder.name, hook=hook, kind=sae.kind, form=sae.form.name,
                           inputs=list(inputs), targets=list(outputs), d_sae=sae.d_sae,
                           training_tokens=sae_cfg["metadata"].get("training_tokens"),
                           outlier_max_norm=max_norm,
                           **(spliced[i] if spliced else {}))
            out = eval_dir / folder.name
            out.mkdir(parents=True, exist_ok=True)
            if sae.form.name == "crosscoder":  # model diffing: each hook's share of the decoder
                metrics.update(write_decoder_norms(sae, sae_cfg, outputs, metrics, out))
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            results[folder.name] = metrics
            if cfg.eval.features and len(inputs) == 1:
                _features(cfg, store, model, sae, hook, outputs[0], held_out, folder.name, out)
            bar.update(1)
        splits.update(_splitting(cfg, [(f.name, s) for f, s, _ in group]))
        inputs_only = reader if isinstance(reader, ActivationReader) else reader.inputs
        universal.update(_universality([(f.name, s) for f, s, _ in group], inputs_only))
    bar.close()
    if splits:
        (eval_dir / "splitting.json").write_text(json.dumps(splits))
    if universal:
        (eval_dir / "universality.json").write_text(json.dumps(universal))
    results = {f.name: results[f.name] for f, _, _ in loaded}  # bank order in the table
    table = summary_table(results)
    (eval_dir / "summary.md").write_text(table + "\n")
    log.info("evaluation on %d held-out tokens:\n%s", len(held_out), table)
    if cfg.eval.dashboard:
        from distributed_sae.eval.dashboard import write_dashboards

        index = write_dashboards(eval_dir, results)
        log.info("dashboards: open %s in a browser", index)
    return results


def _load_model(cfg: RunConfig, store: ActivationStore) -> tuple[Any, Any]:
    """(the whole model with its LM head, its tokenizer) for the spliced loss and features."""
    from distributed_sae.models import load_model, load_tokenizer

    if store.metadata["model_name"] != cfg.model.name:
        raise ConfigError(
            f"the store at {store.path} holds activations of {store.metadata['model_name']!r} but "
            f"model.name={cfg.model.name!r}: set model.name to the store's model, or skip the "
            f"model-based evaluation with eval.spliced=false eval.features=false")

    log.info("loading %s for the spliced loss and feature analysis", cfg.model.name)
    return load_model(cfg.model), load_tokenizer(cfg.model)


def _reader(cfg: RunConfig, store: ActivationStore, rows: range, inputs: tuple[str, ...],
            outputs: tuple[str, ...], max_norm: float | None) -> Any:
    """The held-out batches of a group: tensors of its hook (SAEs), or (input, target) pairs
    read from every hook of the group in lockstep (store/bank_reader.py)."""
    kwargs = dict(shuffle=False, drop_last=False,
                  exclude_token_ids=store.metadata["exclude_token_ids"])
    if inputs == outputs and len(inputs) == 1:
        return ActivationReader(store, inputs[0], rows, cfg.eval.batch_size, max_norm=max_norm,
                                **kwargs)
    hooks = list(dict.fromkeys(inputs + outputs))
    bank = BankReader(store, hooks, rows, cfg.eval.batch_size, seed=0,
                      scales={h: 1.0 for h in hooks}, **kwargs)

    class Pairs:  # re-iterable, as evaluate_saes and _universality each take a pass
        def __iter__(self) -> Any:
            for batch in bank.iter_epoch(0):
                # (batch, d_in), (batch, d_out)
                yield cat_hooks(batch, inputs), cat_hooks(batch, outputs)

    class Inputs:  # the inputs alone (what a member encodes), re-iterable too
        def __iter__(self) -> Any:
            return (x for x, _ in Pairs())

    pairs = Pairs()
    pairs.inputs = Inputs()  # type: ignore[attr-defined]
    return pairs


def _spliced(cfg: RunConfig, store: ActivationStore, model: tuple[Any, Any] | None,
             group: list[tuple[Path, SparseAutoencoder, dict[str, Any]]], rows: range,
             max_norm: float | None = None) -> list[dict[str, Any]] | None:
    """The spliced-loss metrics of each member on the first eval.spliced_tokens held-out tokens
    (eval/replacement.py: an SAE at its hook, a transcoder or CLT replacing MLPs, a crosscoder
    per hook, given as `*_by_hook`)."""
    if not cfg.eval.spliced or model is None:
        return None
    from distributed_sae.eval.replacement import member_splices
    from distributed_sae.eval.spliced import contexts_from_rows, splice_losses
    from distributed_sae.models import arch_spec

    loaded, _ = model
    if not arch_spec(loaded.arch).causal:
        log.warning("%s is not a causal LM: no spliced loss (FVU only)", cfg.model.name)
        return None
    contexts = contexts_from_rows(store, rows, max(1, cfg.eval.spliced_tokens // store.context_size))
    per_member = [[] if _reads_model_b(folder, sae_cfg) else
                  member_splices(loaded, sae, sae_cfg, max_norm) for folder, sae, sae_cfg in group]
    flat = [splice for splices in per_member for _, splice in splices]
    losses = iter(splice_losses(loaded, flat, contexts, cfg.eval.spliced_batch_size,
                                ignore_token_ids=store.metadata["exclude_token_ids"]))
    out = []
    for splices in per_member:
        mine = [(hook, next(losses)) for hook, _ in splices]
        if len(mine) == 1 and mine[0][0] is None:
            out.append(mine[0][1])
        else:  # a crosscoder: per hook, and their mean as the headline numbers
            by_hook = {h: r for h, r in mine}
            mean = {k: sum(r[k] for r in by_hook.values()) / max(1, len(by_hook))
                    for k in SPLICED_KEYS}
            out.append({**mean, "spliced_by_hook": by_hook} if by_hook else {})
    return out


def _reads_model_b(folder: Path, sae_cfg: dict[str, Any]) -> bool:
    """Whether the member reads or writes a hook of the second model ('b/...'): its splices
    would need model_b loaded and run beside model (not done yet), so it gets no spliced loss."""
    hooks = [h for io in member_io(sae_cfg) for h in io if is_model_b(h)]
    if hooks:
        log.warning("%s reads the second model's %s: no spliced loss (FVU only)", folder.name,
                    hooks)
    return bool(hooks)


def _features(cfg: RunConfig, store: ActivationStore, model: tuple[Any, Any] | None,
              sae: SparseAutoencoder, hook: str, target: str, rows: range, member: str,
              out: Path) -> None:
    """features.json and the dashboard's data: contexts from the member's input `hook`, logit
    effects of its decoder rows through the `target` hook it writes (a transcoder feature's
    output reaches the logits from hook_mlp_out)."""
    from distributed_sae.eval.features import feature_report, unembedding, write_feature_report

    loaded, tokenizer = model
    unembed = None
    if is_model_b(target):  # model's LM head is not the second model's (which is not loaded)
        log.warning("%s is the second model's hook: no logit effects for %s", target, member)
    else:
        try:
            unembed = unembedding(loaded, target)
        except ValueError as err:  # no LM head (BERT): contexts and densities only
            log.warning("%s", err)
    report = feature_report(sae, store, hook, rows, tokenizer, unembed,
                            batch_size=min(cfg.eval.batch_size, 1024),
                            n_top=cfg.eval.n_top_contexts, window=cfg.eval.context_window,
                            member=member)
    write_feature_report(report, out)


def _splitting(cfg: RunConfig, members: list[tuple[str, SparseAutoencoder]]) -> dict[str, Any]:
    """Feature splitting between consecutive widths of one hook's bank (splitting.json), within
    members of one kind and k (a k sweep's members differ by more than their width)."""
    from distributed_sae.eval.matching import feature_splitting

    groups: dict[tuple[str, Any], list[tuple[str, SparseAutoencoder]]] = {}
    for name, sae in members:
        groups.setdefault((sae.kind, getattr(sae, "k", None)), []).append((name, sae))
    pairs = []
    for group in groups.values():
        ordered = sorted(group, key=lambda m: m[1].d_sae)
        pairs += list(zip(ordered, ordered[1:]))
    found = {}
    for (name_a, a), (name_b, b) in pairs:
        if a.d_sae == b.d_sae:
            continue
        split = feature_splitting(a, b, threshold=cfg.eval.split_threshold)
        found[f"{name_a}->{name_b}"] = split
        log.info("feature splitting %s -> %s: mean max cosine %.3f, %.1f%% of features split",
                 name_a, name_b, split["mean_max_cosine"], 100 * split["split_fraction"])
    return found


def _universality(members: list[tuple[str, SparseAutoencoder]], reader: Any) -> dict[str, Any]:
    """Activation correlation between members of one hook with the same kind and width (a sweep
    over seeds): how universal the features are -> eval/universality.json."""
    from distributed_sae.eval.matching import activation_correlation

    found = {}
    for i, (name_a, a) in enumerate(members):
        for name_b, b in members[i + 1:]:
            if a.kind != b.kind or a.d_sae != b.d_sae or a.params != b.params:
                continue  # only members that differ by their seed alone
            corr = activation_correlation(a, b, reader)
            found[f"{name_a}~{name_b}"] = corr
            log.info("universality %s ~ %s: mean max correlation %.3f / %.3f", name_a, name_b,
                     corr["mean_max_corr_a"], corr["mean_max_corr_b"])
    return found


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per member, the headline metrics as columns."""
    keys = SUMMARY_KEYS + tuple(k for k in SPLICED_KEYS
                                if all(k in m for m in results.values()))
    head = "| member | d_sae | " + " | ".join(keys) + " |"
    rule = "|" + "---|" * (len(keys) + 2)
    rows = [f"| {name} | {m['d_sae']} | " + " | ".join(f"{m[k]:.4g}" for k in keys) + " |"
            for name, m in results.items()]
    return "\n".join([head, rule, *rows])
