"""One TopK training step: ours against EleutherAI's sparsify and a plain dense PyTorch loop.

    pip install --no-deps --target /tmp/sparsify_pkg eai-sparsify==1.3.3 einops natsort \
        simple-parsing docstring-parser schedulefree
    PYTHONPATH=/tmp/sparsify_pkg python scripts/bench_vs_sparsify.py [--json out.json]

(dictionary_learning for scripts/bench_vs_plain.py --dictionary-learning: `pip install --no-deps
--target /tmp/dl_pkg dictionary-learning==0.1.0`, then add /tmp/dl_pkg to PYTHONPATH.)

The SAE issue and the kernels issue compare against sparsify, whose backward is sparse too (it
trained the issue's SAE at ~2.4x the plain loop's tokens/s; the aim is twice sparsify). This
times, interleaved in one run at the issue's shape (batch 4096, d 576, width 4608, k 32, fp32):
  * ours: bank_trainer.train_step (sparse kernels, fused Adam, unit-norm decoder);
  * sparsify's step as its Trainer runs it with its defaults: decoder renormalised, forward
    (`SparseCoder`, encoder + topk + embedding_bag decoder, FVU loss), backward, parallel-gradient
    removal, SignSGD in a schedule-free wrapper (its default optimiser), on its eager (CPU) decoder;
    and the same with torch Adam, like ours;
  * the plain dense loop of scripts/plain_topk.py.
sparsify is loaded without its package __init__ (which imports its Trainer and, through it,
`datasets`), so only the modules above are needed. Times are minima over --repeats.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from bench_kernels import time_all  # scripts/: the interleaved timer
from plain_topk import plain_dense_step

from distributed_sae.kernels import use_backend
from distributed_sae.sae import TopKSAE, sae_member
from distributed_sae.train.bank_trainer import Member, train_step


def load_package(name: str, modules: list[str]) -> list[types.ModuleType]:
    """Import `modules` of package `name` without running its __init__.py (sparsify's imports
    its Trainer and `datasets`, dictionary_learning's imports `nnsight`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: see scripts/bench_vs_sparsify.py's docstring")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = pkg
    return [importlib.import_module(f"{name}.{m}") for m in modules]


@functools.cache  # load_package replaces sys.modules["sparsify"]: load it once per process
def load_sparsify() -> types.SimpleNamespace:
    """sparsify's SparseCoder, config and SignSGD."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder is CUDA-only
    coder, config, sign = load_package("sparsify", ["sparse_coder", "config", "sign_sgd"])
    from schedulefree import ScheduleFreeWrapper
    return types.SimpleNamespace(SparseCoder=coder.SparseCoder, Config=config.SparseCoderConfig,
                                 SignSGD=sign.SignSGD, ScheduleFree=ScheduleFreeWrapper,
                                 path=str(Path(sys.modules["sparsify"].__path__[0])))


def run_dictionary_learning(data: list[torch.Tensor], width: int, k: int
                            ) -> tuple[float, TopKSAE]:
    """Train dictionary_learning's TopKTrainer over `data` (its update(): geometric-median b_dec,
    Adam at its default lr 2e-4/sqrt(width/2^14), AuxK, grad clip 1, unit-norm decoder); its
    1000-step warm-up is cut to 10 steps (this run has ~100). Returns (seconds, as a TopKSAE)."""
    (top_k,) = load_package("dictionary_learning", ["trainers.top_k"])
    trainer = top_k.TopKTrainer(steps=len(data), activation_dim=data[0].shape[1], dict_size=width,
                                k=k, layer=15, lm_name="SmolLM2-135M",
                                warmup_steps=min(10, len(data) - 1),
                                device="cpu")
    start = time.perf_counter()
    for step, x in enumerate(data):
        trainer.update(step, x)
    seconds = time.perf_counter() - start
    ae, ours = trainer.ae, TopKSAE(data[0].shape[1], width, k)
    with torch.no_grad():
        ours.W_enc.copy_(ae.encoder.weight.t())
        ours.b_enc.copy_(ae.encoder.bias)
        ours.W_dec.copy_(ae.decoder.weight.t())
        ours.b_dec.copy_(ae.b_dec)
    return seconds, ours


def sparsify_trainer(sp: types.SimpleNamespace, d: int, width: int, k: int,
                     optimizer: str = "signum") -> tuple[Any, Any, Callable[[torch.Tensor], None]]:
    """(its SparseCoder, its optimiser, one training step on a batch) as sparsify's Trainer runs
    them: decoder renormalised, forward (FVU loss), backward, parallel-gradient removal, step.
    `signum` is its default (SignSGD, schedule-free wrapper, lr 5e-3 / sqrt(width / 2^14));
    `adam` uses torch Adam at its Adam default lr 2e-4 / sqrt(width / 2^14)."""
    sae = sp.SparseCoder(d, sp.Config(num_latents=width, k=k))
    scale = (width / 2**14) ** 0.5
    if optimizer == "signum":
        opt = sp.ScheduleFree(sp.SignSGD([{"params": sae.parameters(), "lr": 5e-3 / scale}]),
                              momentum=0.95)
        opt.train()
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / scale)

    def step(x: torch.Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        sae(x, dead_mask=None).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return sae, opt, step


def sparsify_start(d: int, width: int, k: int, mean: torch.Tensor
                   ) -> tuple[Any, Any, Callable[[torch.Tensor], None]]:
    """sparsify_trainer with b_dec started at the data mean, as its Trainer does."""
    sae, opt, step = sparsify_trainer(load_sparsify(), d, width, k)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
    return sae, opt, step


def sparsify_as_ours(sae: Any, opt: Any) -> TopKSAE:
    """The trained SparseCoder's averaged weights as one of our TopKSAEs, for evaluation. Its
    encoder is ReLU then top-k; ours top-k then ReLU: the same values."""
    opt.eval()  # schedule-free: evaluate at the averaged weights, as its Trainer saves them
    ours = TopKSAE(sae.d_in, sae.num_latents, sae.cfg.k)
    with torch.no_grad():
        ours.W_enc.copy_(sae.encoder.weight.t())
        ours.b_enc.copy_(sae.encoder.bias)
        ours.W_dec.copy_(sae.W_dec)
        ours.b_dec.copy_(sae.b_dec)
    return ours


def run_sparsify(data: list[torch.Tensor], width: int, k: int, mean: torch.Tensor
                 ) -> tuple[float, TopKSAE]:
    """Train sparsify's SparseCoder over `data` with its defaults; returns (seconds, the same
    weights as one of our TopKSAEs)."""
    sae, opt, step = sparsify_start(data[0].shape[1], width, k, mean)
    start = time.perf_counter()
    for x in data:
        step(x)
    seconds = time.perf_counter() - start
    return seconds, sparsify_as_ours(sae, opt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sp = load_sparsify()
    x = torch.randn(a.batch, a.d, generator=torch.Generator().manual_seed(1))
    sae = TopKSAE(a.d, a.width, k=a.k, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    member = Member(sae_member("h", "topk", a.width, seed=0, k=a.k), sae, opt,
                    torch.zeros(a.width, dtype=torch.long))
    plain = [torch.nn.Parameter(p.detach().clone()) for p in
             (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    plain_opt = torch.optim.Adam(plain, lr=1e-4)
    with use_backend("torch"):
        t = time_all({"ours": lambda: train_step(member, x, 1e-4, 1.0, 10**9),
                      "sparsify_signum": partial(sparsify_trainer(sp, a.d, a.width, a.k)[2], x),
                      "sparsify_adam": partial(sparsify_trainer(sp, a.d, a.width, a.k,
                                                                "adam")[2], x),
                      "plain_dense": lambda: plain_dense_step(plain, plain_opt, x, a.k)},
                     a.repeats)
    ms = {name: v * 1e3 for name, v in t.items()}
    print(f"sparsify from {sp.path}; batch {a.batch}, d {a.d}, width {a.width}, k {a.k}, "
          f"{torch.get_num_threads()} threads; min of {a.repeats} (ms)")
    for name, v in ms.items():
        print(f"| {name} | {v:.1f} | {a.batch / v * 1e3:,.0f} tokens/s |")
    ratios: dict[str, Any] = {
        "sparsify_signum_over_ours": t["sparsify_signum"] / t["ours"],
        "sparsify_adam_over_ours": t["sparsify_adam"] / t["ours"],
        "plain_over_sparsify_signum": t["plain_dense"] / t["sparsify_signum"],
        "plain_over_ours": t["plain_dense"] / t["ours"]}
    print("  ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"ms": ms, **ratios, "args": vars(a)}, indent=1))


if __name__ == "__main__":
    main()
