"""Shared sizes, parameters and helpers of tests/test_forms.py and tests/test_forms_io.py."""

from __future__ import annotations

import torch
from distributed_sae.sae import sae_class
from distributed_sae.sae.forms import Form


D_IN, D_OUT, N, BATCH = 16, 12, 64, 32
# Small, fast parameters per kind; the thresholds sit inside the spread of pre-activations of
# unit-norm encoder columns on N(0, 1) inputs, so a good share of latents fires.
PARAMS = {
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "relu": {"l1_coefficient": 0.01, "recipe": "april_2024"},
    "jumprelu": {"init_threshold": 0.1, "bandwidth": 0.1, "l0_coefficient": 1e-3},
    "matryoshka": {"k": 4, "fractions": (0.25, 1.0)},
    "gated": {"l1_coefficient": 0.01},
}
KINDS = list(PARAMS)
TRANSCODERS = ("transcoder", "skip_transcoder")
# A CLT needs each latent's code to depend on its own pre-activation (per_latent_codes): TopK's
# per-token top-k over all layers' latents would let layer l's features read later layers.
CLT_KINDS = [k for k in KINDS if sae_class(k).per_latent_codes]
FORMS_OF_KIND = [(kind, form) for kind in KINDS
                 for form in TRANSCODERS + ("crosscoder", "clt")
                 if form != "clt" or kind in CLT_KINDS]

# Crosscoder over 3 hooks of width 8; CLT over 4 layers, MLP inputs 8 wide and outputs 6 wide
# (different widths, so a mix-up of input and output blocks cannot go unnoticed).
CROSS_DIMS = (8, 8, 8)
CLT_IN, CLT_OUT, CLT_LAYERS = 8, 6, 4


def form_of(name: str) -> Form:
    """The test's Form of each form name."""
    if name in TRANSCODERS:
        return Form(name, (D_IN,), (D_OUT,))
    if name == "crosscoder":
        return Form(name, CROSS_DIMS)
    if name == "clt":
        return Form(name, (CLT_IN,) * CLT_LAYERS, (CLT_OUT,) * CLT_LAYERS)
    return Form.sae(D_IN)


def make(kind: str, form: Form, seed: int = 0, dtype: torch.dtype = torch.float32):
    return sae_class(kind)(form.d_in, N, **PARAMS[kind], seed=seed, dtype=dtype, form=form)


def randn(shape, gen: torch.Generator, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@torch.no_grad()
def randomize(sae, seed: int = 1):
    """Non-trivial biases, skip path and thresholds, so each term of the reference matters
    (fresh SAEs have b_dec = b_enc = W_skip = 0). A CLT's forbidden blocks stay 0."""
    g = torch.Generator().manual_seed(seed)
    dt = sae.W_enc.dtype
    sae.b_enc.copy_(randn(sae.b_enc.shape, g, 0.1, dt))
    sae.b_dec.copy_(randn(sae.b_dec.shape, g, 0.5, dt))
    if sae.form.skip:
        sae.W_skip.copy_(randn(sae.W_skip.shape, g, 0.2, dt))
    if sae.kind == "gated":
        sae.r_mag.copy_(randn(sae.r_mag.shape, g, 0.2, dt))
        sae.b_mag.copy_(randn(sae.b_mag.shape, g, 0.1, dt))
    if sae.kind == "jumprelu":  # per-latent thresholds in [0.05, 0.15)
        sae.log_threshold.copy_((0.05 + 0.1 * torch.rand(N, generator=g, dtype=torch.float64))
                                .log().to(dt))
    if sae.kind in ("batchtopk", "matryoshka"):  # nonzero: eval mode really thresholds
        sae.threshold.fill_(0.05)
    return sae


def data(form: Form, seed: int = 2, rows: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (rows, d_in), y (rows, d_out)), independent standard normals."""
    g = torch.Generator().manual_seed(seed)
    return randn((rows, form.d_in), g), randn((rows, form.d_out), g)


def dense_decode(sae, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y_hat = f W_dec + b_dec (+ x W_skip^T), written out: (batch, d_sae) -> (batch, d_out)."""
    y_hat = f @ sae.W_dec + sae.b_dec
    if sae.form.skip:
        y_hat = y_hat + x @ sae.W_skip.t()
    return y_hat


def activate(sae, pre: torch.Tensor) -> torch.Tensor:
    """The kind's activation by hand on (batch, d_sae) pre-activations (topk, relu, jumprelu)."""
    if sae.kind == "topk":
        values, indices = pre.topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter_(1, indices, values.relu())
    if sae.kind == "relu":
        return pre.relu()
    if sae.kind == "jumprelu":
        return pre * (pre > sae.threshold)
    raise AssertionError(f"no hand-written activation for {sae.kind}")


def close(a, b, rtol: float = 1e-5, atol: float = 1e-5, msg: str = "") -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=(lambda m: f"{msg}: {m}")
                               if msg else None)


