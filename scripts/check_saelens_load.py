"""Check that folders written by save_sae load in the real SAELens and compute what load_sae does.

Run with the project's venv and an isolated SAELens install on the path, e.g.
    PYTHONPATH=/tmp/sl_pkgs .venv/bin/python scripts/check_saelens_load.py
Prints one line per case (our kind/form, cfg architecture, SAELens class, max |diff|) and a
summary; exits 1 if any folder is refused by SAELens or its outputs differ by >= 1e-5.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from sae_lens import SAE as SLSAE  # the real SAELens, not this project's alias

from distributed_sae.sae import load_sae, save_sae, sae_class
from distributed_sae.sae.forms import Form

D_IN, D_OUT, D_SAE, TOL = 16, 12, 64, 1e-5
# (our kind, our form, constructor keywords): every kind whose export SAELens 6.54 has a class for.
CASES = [("relu", "sae", {}), ("topk", "sae", {"k": 8}), ("jumprelu", "sae", {}),
         ("batchtopk", "sae", {"k": 8}), ("gated", "sae", {}),
         ("relu", "transcoder", {}), ("relu", "skip_transcoder", {}),
         ("jumprelu", "transcoder", {}), ("jumprelu", "skip_transcoder", {}),
         ("batchtopk", "transcoder", {"k": 8}), ("batchtopk", "skip_transcoder", {"k": 8})]


@torch.no_grad()
def randomise(sae: torch.nn.Module, gen: torch.Generator) -> None:
    """Fresh SAEs have zero biases / W_skip / r_mag and tiny thresholds, which would hide a wrong
    bias convention or a missing skip path: give every such tensor random values instead."""
    def rnd(t: torch.Tensor, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale
    for name in ("b_enc", "b_dec", "W_skip", "r_mag", "b_mag"):
        if hasattr(sae, name):
            getattr(sae, name).copy_(rnd(getattr(sae, name)))
    if sae.kind == "jumprelu":  # per-latent θ in [0.1, 1]: a good share of latents gated off
        sae.log_threshold.copy_(torch.empty(D_SAE).uniform_(0.1, 1.0, generator=gen).log())
    if sae.kind == "batchtopk":  # one shared θ > 0 (exported as a per-latent jumprelu threshold)
        sae.threshold.fill_(0.5)


def check(kind: str, form_name: str, kwargs: dict, root: Path, gen: torch.Generator) -> bool:
    d_out = D_IN if form_name == "sae" else D_OUT
    form = Form(form_name, (D_IN,), () if form_name == "sae" else (D_OUT,))
    sae = sae_class(kind)(D_IN, D_SAE, **kwargs, form=form)
    randomise(sae, gen)
    folder = root / f"{kind}_{form_name}"
    meta = {"hook_name": "blocks.3.ln2.hook_normalized", "model_name": "x"}
    if form_name != "sae":
        meta["hook_name_out"] = "blocks.3.hook_mlp_out"
    save_sae(sae, folder, metadata=meta)
    arch = json.loads((folder / "cfg.json").read_text())["architecture"]
    label = f"{kind:9s} {form_name:15s} cfg={arch:24s}"
    try:  # SAELens's own loader: cfg.json parsing, class dispatch, state-dict loading
        theirs = SLSAE.load_from_disk(folder)
    except Exception as exc:  # a refusal is a finding about our format: report it verbatim
        print(f"FAIL {label} SAELens refused: {type(exc).__name__}: {exc}")
        return False
    ours = load_sae(folder)[0].eval()  # eval: batchtopk uses its threshold, as SAELens does
    theirs.eval()
    x = torch.randn(256, D_IN, generator=gen)
    with torch.no_grad():
        y_ours, y_theirs = ours(x), theirs(x)  # SAELens's skip transcoders add W_skip x here
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
    ok = y_theirs.shape == (256, d_out) and y_ours.shape == y_theirs.shape
    diff = max((y_ours - y_theirs).abs().max().item(), (f_ours - f_theirs).abs().max().item()) \
        if ok else float("inf")
    ok = ok and diff < TOL
    # Fraction of active codes, to show the thresholds/top-k really gate something.
    l0 = (f_theirs > 0).float().mean().item()
    print(f"{'ok  ' if ok else 'FAIL'} {label} SAELens={type(theirs).__name__:22s} "
          f"max|diff|={diff:.2e} active={l0:.2f}")
    return ok


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(kind, form, kw, Path(tmp), gen) for kind, form, kw in CASES]
    print(f"{sum(results)}/{len(results)} cases load in SAELens and match load_sae "
          f"(tol {TOL:g})")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
