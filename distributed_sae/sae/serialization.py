"""Save and load one SAE as a SAELens 6.x folder: cfg.json + sae_weights.safetensors.

cfg.json carries SAELens's keys (architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations and the kind's own, e.g. k) and a free-form `metadata`
object with the provenance (model, hook, corpus) and what this project needs to rebuild the exact
training-time class (`dsae_kind`, `dsae_params`). `metadata.sae_lens_version` must be >= 6.0.0 or
SAELens's loader treats the folder as its old format and renames keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.store.commits import fsync_path
from distributed_sae.faults import fault_point
from distributed_sae.sae.forms import Form
from distributed_sae.sae.registry import sae_class

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) beside `path`, fsync it, rename it over `path`, fsync the folder: a crash at
    any point leaves the old file or the new one, never a part of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_sae(sae: SparseAutoencoder, folder: str | Path, metadata: dict[str, Any] | None = None,
             dtype: torch.dtype | None = None) -> Path:
    """Write `sae` into `folder` (created); input scaling must already be folded in.

    Each file is written atomically (atomic_write), the weights first and cfg.json last, which
    records the weights' sha256 (`metadata.dsae_weights_sha256`): a crash between the two leaves
    a cfg.json that load_sae finds at odds with the weights and refuses by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype or sae.W_enc.dtype
    # The kind names its SAELens tensors: the four weights, plus `threshold` (d_sae,) for kinds
    # exported as 'jumprelu'.
    tensors = {name: t.detach().to("cpu", dtype).contiguous()
               for name, t in sae.saelens_tensors().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    meta = dict(metadata or {}, sae_lens_version=SAELENS_FORMAT_VERSION, dsae_kind=sae.kind,
                dsae_params=sae.extra_state(),
                dsae_weights_sha256=file_sha256(folder / WEIGHTS_FILE))
    cfg = {**sae.saelens_cfg(), "d_in": sae.d_in, "d_sae": sae.d_sae,
           "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
           "apply_b_dec_to_input": sae.form.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta}
    if sae.form.name != "sae":
        cfg.update(architecture=form_architecture(cfg["architecture"], sae.form), d_out=sae.d_out)
        meta["dsae_form"] = sae.form.to_json()
    fault_point("member_write")  # new weights beside the old cfg.json
    atomic_write(folder / CFG_FILE, lambda tmp: tmp.write_text(json.dumps(cfg, indent=2)))
    return folder


# SAELens inference architectures -> the kind that computes the same function, for folders
# written by other tools (no `dsae_kind` in their metadata).
ARCHITECTURE_KINDS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
                      "gated": "gated", "transcoder": "relu", "skip_transcoder": "relu",
                      "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}
# SAELens 6.x's transcoder classes (sae_lens/saes/transcoder.py): (its SAE architecture, skip) ->
# the transcoder architecture, same tensors plus W_skip (d_out, d_in) for the skip kinds.
SAELENS_TRANSCODERS = {("standard", False): "transcoder", ("standard", True): "skip_transcoder",
                       ("jumprelu", False): "jumprelu_transcoder",
                       ("jumprelu", True): "jumprelu_skip_transcoder"}


def form_architecture(architecture: str, form: Form) -> str:
    """cfg.json's architecture of a kind exported as `architecture`, in `form`: SAELens's own
    transcoder names where it has one (standard and jumprelu inference), else
    '<architecture>_<form>' (e.g. topk_transcoder, topk_crosscoder, topk_clt), which only this
    project's loader reads (SAELens 6.54 has no topk or gated transcoder, no crosscoder or CLT
    class)."""
    if form.name == "sae":
        return architecture
    known = SAELENS_TRANSCODERS.get((architecture, form.skip))
    if known is not None and form.name in ("transcoder", "skip_transcoder"):
        return known
    return f"{architecture}_{form.name}"


def _form(cfg: dict[str, Any], path: Path) -> Form:
    """The Form of a cfg.json: metadata.dsae_form, or SAELens's transcoder keys (d_out)."""
    meta = cfg.get("metadata") or {}
    if "dsae_form" in meta:
        return Form.from_json(meta["dsae_form"])
    arch = cfg["architecture"]
    if arch in SAELENS_TRANSCODERS.values():
        if not isinstance(cfg.get("d_out"), int):
            raise ValueError(f"{path}: a {arch} needs d_out (the target's width)")
        name = "skip_transcoder" if "skip" in arch else "transcoder"
        return Form(name, (cfg["d_in"],), (cfg["d_out"],))
    return Form.sae(cfg["d_in"])
REQUIRED_CFG_KEYS = ("architecture", "d_in", "d_sae")


def _read_cfg(folder: Path) -> dict[str, Any]:
    """cfg.json of `folder`, with the keys loading needs checked."""
    path = folder / CFG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CFG_FILE}: not an SAE folder")
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} has {CFG_FILE} but no {WEIGHTS_FILE}: the weights are "
                                "missing (an interrupted copy or download?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    missing = [k for k in REQUIRED_CFG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a SAELens cfg.json")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ValueError(f"{path}: {key}={cfg[key]!r} must be a positive integer")
    return cfg


def _kind_and_params(cfg: dict[str, Any], path: Path) -> tuple[str, dict[str, Any], Form]:
    """The class to rebuild, its constructor keywords and its form; refuses a cfg.json at odds
    with itself."""
    meta = cfg.get("metadata") or {}
    arch = cfg["architecture"]
    kind = meta.get("dsae_kind") or ARCHITECTURE_KINDS.get(arch)
    if kind is None:
        raise ValueError(f"{path}: architecture {arch!r} has no distributed-sae kind; known: "
                         f"{sorted(ARCHITECTURE_KINDS)}")
    params = dict(meta.get("dsae_params") or {})
    if "k" in cfg:  # topk: cfg.json's k is what SAELens uses, so it must be the one we use
        if params.setdefault("k", cfg["k"]) != cfg["k"]:
            raise ValueError(f"{path}: k={cfg['k']} but metadata.dsae_params.k={params['k']}; "
                             "the file was edited by hand or mixed from two SAEs")
    # Options that change SAELens's forward pass in ways our kinds do not compute.
    form = _form(cfg, path)
    unsupported = {"apply_b_dec_to_input": form.apply_b_dec_to_input,
                   "normalize_activations": "none", "rescale_acts_by_decoder_norm": False}
    for key, ours in unsupported.items():
        if cfg.get(key, ours) != ours:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (only {ours!r}): "
                             "fold it into the weights before loading")
    expected = form_architecture(sae_class(kind).architecture, form)
    if expected != arch:
        raise ValueError(f"{path}: architecture {arch!r} disagrees with kind {kind!r}, which "
                         f"exports as {expected!r}")
    return kind, params, form


def _check_sha(folder: Path, cfg: dict[str, Any]) -> None:
    """Refuse weights that are not the file cfg.json was saved with (folders written by this
    project record its sha256; others are not checked)."""
    want = (cfg.get("metadata") or {}).get("dsae_weights_sha256")
    if want is not None and file_sha256(folder / WEIGHTS_FILE) != want:
        raise ValueError(f"{folder / WEIGHTS_FILE} is not the file its cfg.json was saved with "
                         f"(sha256 differs): the folder was half-written or edited; train or "
                         f"export it again")


def load_sae(folder: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Rebuild an SAE saved by `save_sae` (or any SAELens standard/topk/jumprelu/gated folder);
    returns (sae, cfg). Refuses files whose cfg.json and tensors disagree, naming the mismatch."""
    folder = Path(folder)
    cfg = _read_cfg(folder)
    kind, params, form = _kind_and_params(cfg, folder / CFG_FILE)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception:
        _check_sha(folder, cfg)  # a half-written file: say so rather than safetensors' error
        raise
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    dtype = tensors["W_enc"].dtype if "W_enc" in tensors else torch.float32
    sae = sae_class(kind)(d_in, d_sae, **params, dtype=dtype, form=form)
    # Expected names and shapes come from the kind built at cfg.json's sizes.
    want = {name: tuple(t.shape) for name, t in sae.saelens_tensors().items()}
    if set(tensors) != set(want):
        raise ValueError(f"{folder / WEIGHTS_FILE} holds {sorted(tensors)}, expected {sorted(want)}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {name} has shape "
                             f"{tuple(tensors[name].shape)} but cfg.json says {shape} "
                             f"(d_in={d_in}, d_sae={d_sae})")
    _check_sha(folder, cfg)  # after the shape checks, which name the mismatch more exactly
    sae.load_saelens_tensors(tensors)
    # A loaded SAE is for inference: eval mode makes BatchTopK-style kinds use their threshold.
    sae.eval()
    return sae, cfg
