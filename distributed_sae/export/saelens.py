"""The export stage: one SAELens-loadable folder per member, with metrics and a model card.

Each folder holds cfg.json + sae_weights.safetensors (see sae/serialization.py), and when the eval
stage ran: sparsity.safetensors (log10 feature density, shape (d_sae,)), metrics.json, the
frontier and density plots, and a README.md model card. SAELens loads a folder with
`SAE.load_from_disk(path)`; this project with `distributed_sae.SAE.load(path)`.
`push_export` uploads the whole bank (one sub-folder per member) to a Hub repo.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from distributed_sae.export.interp_card import interp_section
from distributed_sae.sae import load_sae, save_sae

if TYPE_CHECKING:
    from distributed_sae.config import RunConfig

log = logging.getLogger(__name__)

FRONT_MATTER = ["---", "library_name: saelens", "tags:", "- sparse-autoencoder",
                "- distributed-sae", "---", ""]
# Metrics of the card's table, in order, when present (loss recovered / KL need the spliced run).
CARD_METRICS = (
    ("fvu", "FVU (fraction of variance unexplained)"), ("explained_variance", "explained variance"),
    ("mse", "MSE"), ("l0", "L0 (active latents per token)"), ("dead_fraction", "dead fraction"),
    ("dense_fraction", "dense fraction (fires on >10% of tokens)"),
    ("loss_recovered", "fraction of CE loss recovered"), ("kl_div", "KL(clean || spliced)"),
    ("ce_clean", "CE loss, clean"), ("ce_spliced", "CE loss, SAE spliced in"),
    ("ce_zero", "CE loss, hook zero-ablated"),
)
# Plots copied from the eval stage's folder: (source relative to eval/, name in the export).
PLOTS = (("frontier.png", "frontier.png", "sparsity-fidelity frontier of the bank"),
         ("{member}/density.png", "density.png", "feature density"))
REPO_PLACEHOLDER = "<org>/<repo>"
FORM_WORDS = {"sae": "sparse autoencoder", "skip_transcoder": "skip-transcoder",
              "clt": "cross-layer transcoder"}
# Architectures SAELens 6.54 registers a class for (sae_lens/__init__.py's register_sae_class).
SAELENS_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder",
                         "jumprelu_transcoder", "jumprelu_skip_transcoder")


def _load_lines(name: str, repo_id: str | None, saelens: bool = True) -> list[str]:
    """How to load member `name`; on the Hub every member is a sub-folder of the repo.
    `saelens`: whether SAELens has a class for the folder's architecture."""
    repo = repo_id or REPO_PLACEHOLDER
    ours = [
        "## Load it", "", "With distributed-sae:", "", "```python", "from distributed_sae import SAE",
        f'sae = SAE.load("path/to/{name}")                  # this folder',
        f'sae = SAE.load("{repo}", member="{name}")  # from the Hub',
        "features = sae.encode(activations)  # (batch, d_in) -> (batch, d_sae)", "```", ""]
    if not saelens:
        return ours + ["SAELens (6.54) has no class for this architecture; the files follow its "
                       "layout (cfg.json + sae_weights.safetensors) and are read by "
                       "distributed-sae's loader.", ""]
    return [
        "## Load it", "", "With distributed-sae:", "", "```python", "from distributed_sae import SAE",
        f'sae = SAE.load("path/to/{name}")                  # this folder',
        f'sae = SAE.load("{repo}", member="{name}")  # from the Hub',
        "features = sae.encode(activations)  # (batch, d_in) -> (batch, d_sae)", "```", "",
        "With SAELens (>= 6):", "", "```python", "from sae_lens import SAE",
        f'sae = SAE.load_from_disk("path/to/{name}")',
        f'sae = SAE.from_pretrained("{repo}", "{name}")', "```", "",
    ]


def model_card(name: str, cfg: Mapping[str, Any], metrics: Mapping[str, Any] | None,
               plots: Mapping[str, str] | None = None, repo_id: str | None = None,
               sections: Sequence[str] = ()) -> str:
    """README.md of one exported SAE: what it is, its metrics, plots ({file: caption}), more
    sections' lines (interpretability), and how to load it with this project and SAELens."""
    meta = cfg.get("metadata") or {}
    kind = meta.get("dsae_kind", cfg["architecture"])
    params = ", ".join(f"{k}={v}" for k, v in (meta.get("dsae_params") or {}).items())
    form = (meta.get("dsae_form") or {}).get("name", "sae")
    inputs = meta.get("dsae_inputs") or [meta.get("hook_name")]
    targets = meta.get("dsae_targets") or inputs
    hooks = (f"`{inputs[0]}`" if targets == inputs and len(inputs) == 1 else
             f"{', '.join(f'`{h}`' for h in inputs)} -> {', '.join(f'`{h}`' for h in targets)}")
    rows = [("model", f"`{meta.get('model_name')}`"), ("hooks", hooks), ("form", form),
            ("kind", f"{kind} ({params})" if params else kind),
            ("SAELens architecture", f"`{cfg['architecture']}`"),
            ("d_in / d_sae / d_out", f"{cfg['d_in']} / {cfg['d_sae']} / "
                                     f"{cfg.get('d_out', cfg['d_in'])}"),
            ("training tokens", meta.get("training_tokens")),
            ("dataset", f"`{meta.get('dataset_path')}`"), ("dtype", cfg.get("dtype"))]
    lines = [*FRONT_MATTER, f"# {name}", "",
             f"A {kind} {FORM_WORDS.get(form, form)} with {cfg['d_sae']} latents on {hooks} "
             f"of `{meta.get('model_name')}`, trained with distributed-sae.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if metrics:
        lines += [f"## Metrics ({metrics.get('n_tokens', '?')} held-out tokens)", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {metrics[key]:.4g} |" for key, label in CARD_METRICS
                  if isinstance(metrics.get(key), (int, float))]
        lines.append("")
    for file, caption in (plots or {}).items():
        lines += [f"![{caption}]({file})", ""]
    lines += list(sections)
    known = cfg["architecture"] in SAELENS_ARCHITECTURES
    return "\n".join(lines + _load_lines(name, repo_id, known))


def export_member(src: Path, export_dir: Path, dtype: torch.dtype, eval_dir: Path | None,
                  repo_id: str | None = None) -> Path:
    """Write one trained member folder `src` as export_dir/<name>, with what eval_dir holds."""
    sae, sae_cfg = load_sae(src)
    dst = save_sae(sae, Path(export_dir) / src.name, metadata=sae_cfg["metadata"], dtype=dtype)
    metrics_file = eval_dir / src.name / "metrics.json" if eval_dir else None
    metrics = None
    if metrics_file and metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        density = torch.tensor(metrics.pop("log10_density"), dtype=torch.float32)
        save_file({"sparsity": density}, str(dst / "sparsity.safetensors"))
        (dst / "metrics.json").write_text(json.dumps(metrics, indent=2))
    else:
        log.warning("no metrics for %s (run dsae-eval first): exporting weights only", src.name)
    plots = {}
    for source, name, caption in PLOTS if eval_dir else ():
        path = eval_dir / source.format(member=src.name)
        if path.is_file():
            shutil.copyfile(path, dst / name)
            plots[name] = caption
    sections: list[str] = []
    if eval_dir:  # the interp stage's scores, when it ran
        sections, copies = interp_section(eval_dir.parent / "interp", src.name)
        for path, name in copies.items():
            shutil.copyfile(path, dst / name)
    card = model_card(src.name, json.loads((dst / "cfg.json").read_text()), metrics, plots,
                      repo_id, sections)
    (dst / "README.md").write_text(card)
    return dst


def export(cfg: RunConfig) -> list[Path]:
    """Write every trained member to cfg.export.path; returns the folders."""
    from distributed_sae.eval import trained_members  # the eval package pulls in the store

    dtype = getattr(torch, cfg.export.dtype)
    eval_dir = Path(cfg.out_dir) / "eval"
    repo_id = cfg.export.hub_repo_id  # named in the cards when configured
    folders = [export_member(src, Path(cfg.export.path), dtype, eval_dir, repo_id)
               for src in tqdm(trained_members(cfg.out_dir), desc="export", unit="member")]
    log.info("exported %d SAEs to %s", len(folders), cfg.export.path)
    if repo_id:
        url = push_export(cfg.export.path, repo_id, cfg.export.hub_revision, cfg.export.hub_private)
        log.info("pushed the bank to %s", url)
    return folders


def bank_card(export_dir: str | Path, repo_id: str | None = None) -> str:
    """The repo-level README.md of an exported bank: one row per member folder."""
    export_dir = Path(export_dir)
    members = sorted(p.parent for p in export_dir.glob("*/cfg.json"))
    if not members:
        raise FileNotFoundError(f"{export_dir} holds no exported SAE folders: run dsae-export")
    lines = [*FRONT_MATTER, "# SAEs trained with distributed-sae", "",
             "One folder per SAE (SAELens 6 format: cfg.json + sae_weights.safetensors).", "",
             "| member | model | hook | d_sae | L0 | FVU | loss recovered |",
             "|---|---|---|---|---|---|---|"]
    for folder in members:
        cfg = json.loads((folder / "cfg.json").read_text())
        meta = cfg.get("metadata") or {}
        metrics_file = folder / "metrics.json"
        m = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        cells = [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "" for k in
                 ("l0", "fvu", "loss_recovered")]
        lines.append(f"| [{folder.name}]({folder.name}/README.md) | `{meta.get('model_name')}` | "
                     f"`{meta.get('hook_name')}` | {cfg['d_sae']} | " + " | ".join(cells) + " |")
    lines.append("")
    if (members[0] / "frontier.png").is_file():
        lines += [f"![sparsity-fidelity frontier]({members[0].name}/frontier.png)", ""]
    return "\n".join(lines + _load_lines(members[0].name, repo_id))


def push_export(export_dir: str | Path, repo_id: str, revision: str | None = None,
                private: bool = False, token: str | None = None) -> str:
    """Upload an exported bank to the Hub repo `repo_id` (one sub-folder per member) on branch
    `revision` (None = main). Writes export_dir/README.md, the repo's card with front matter
    `library_name: saelens`, first. Token: `token`, else HF_TOKEN / the stored login."""
    from distributed_sae.export.hub import push_to_hub

    export_dir = Path(export_dir)
    (export_dir / "README.md").write_text(bank_card(export_dir, repo_id))
    return push_to_hub(export_dir, repo_id, revision=revision, private=private, token=token,
                       commit_message=f"Upload {len(list(export_dir.glob('*/cfg.json')))} SAEs "
                                      "trained with distributed-sae")
