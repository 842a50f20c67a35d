"""Our TopK training against a plain dense PyTorch loop on the same activations (issue 4's table).

    dsae-harvest out_dir=runs/bench440 data.n_tokens=450560        # 400k train + 40k held out
    python scripts/bench_vs_plain.py --store runs/bench440/store

Protocol (the SAE issue's): SmolLM2 layer 15 hook_resid_post, ~400k training tokens of CPython
text, TopK k=32, width 4608, batch 4096, one pass; then on ~40k held-out tokens: FVU, L0, dead
latents, and the fraction of LM loss recovered with the SAE spliced in (clean / zero-ablated /
spliced cross-entropy of the real model). Both trainers see the same scaled batches, in the same
order, preloaded into memory (so neither pays for reading); each run's wall time covers its
steps only. Ours is BankTrainer (sparse kernels, AuxK, lr warm-up and decay); the plain loop is
scripts/plain_topk.py with constant lr. With --sparsify, EleutherAI's sparsify trains on the same
batches too, with its defaults (scripts/bench_vs_sparsify.py says how to install it). Prints a
table and the tokens/s ratios measured in this run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from plain_topk import plain_dense_step, plain_params  # the baseline loop

from distributed_sae.config import HarvestConfig, ModelConfig, RunConfig, SAEConfig, StoreConfig, TrainConfig
from distributed_sae.eval import evaluate_saes
from distributed_sae.eval.spliced import contexts_from_rows, spliced_loss
from distributed_sae.models import load_model
from distributed_sae.sae import TopKSAE, sae_member
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.train import BankTrainer, input_scale
from distributed_sae.train.optim import to_saved

HOOK = "blocks.15.hook_resid_post"


def train_batches(store: ActivationStore, rows: range, batch: int, scale: float) -> list[torch.Tensor]:
    reader = ActivationReader(store, HOOK, rows, batch, seed=0, scale=scale,
                              exclude_token_ids=store.metadata["exclude_token_ids"])
    return list(reader)


def ours_bank(data: list[torch.Tensor], width: int, k: int, lr: float | None, mean: torch.Tensor,
              store_path: str, optimizer: str = "adam") -> BankTrainer:
    """Our one-member TopK bank for `data` (lr None: the optimiser's default)."""
    cfg = RunConfig(harvest=HarvestConfig(hooks=[HOOK]), store=StoreConfig(path=store_path),
                    sae=SAEConfig(widths=[width], k=k),
                    train=TrainConfig(batch_size=data[0].shape[0], lr=lr, optimizer=optimizer),
                    out_dir="unused")
    return BankTrainer(cfg, [sae_member(HOOK, "topk", width, seed=0, k=k)], data[0].shape[1],
                       mean, len(data))


def ours_result(bank: BankTrainer) -> tuple[TopKSAE, float]:
    """(the SAE at the weights it saves, fraction of latents that never fired in training)."""
    m = bank.members[0]
    to_saved([m], bank.cfg.train.signum_unit_decoder)  # the weights the trainer saves
    return m.sae, float((m.since_fired >= bank.tokens_seen).float().mean())


def run_ours(data: list[torch.Tensor], width: int, k: int, lr: float | None, mean: torch.Tensor,
             store_path: str, optimizer: str = "adam") -> tuple[float, TopKSAE, float]:
    """Train our TopK member over `data` (lr None: the optimiser's default); returns (seconds,
    the SAE at the weights it saves, fraction of latents that never fired in training)."""
    bank = ours_bank(data, width, k, lr, mean, store_path, optimizer)
    start = time.perf_counter()
    for x in data:
        bank.step(x, record=False)
    seconds = time.perf_counter() - start
    return (seconds, *ours_result(bank))


def run_plain(data: list[torch.Tensor], width: int, k: int, lr: float) -> tuple[float, TopKSAE]:
    params = plain_params(data[0].shape[1], width)
    opt = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    for x in data:
        plain_dense_step(params, opt, x, k)
    seconds = time.perf_counter() - start
    sae = TopKSAE(data[0].shape[1], width, k)
    with torch.no_grad():
        for p, v in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), params):
            p.copy_(v)
    return seconds, sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--dictionary-learning", action="store_true",
                    help="also train dictionary_learning's TopKTrainer on the same batches")
    ap.add_argument("--sparsify", action="store_true",
                    help="also train EleutherAI's sparsify on the same batches (installed as in "
                         "scripts/bench_vs_sparsify.py)")
    args = ap.parse_args()

    store = ActivationStore.open(args.store)
    train_rows, held = split_rows(store, args.eval_tokens / store.n_tokens)
    scale, mean = input_scale(store, HOOK)
    data = train_batches(store, train_rows, args.batch, scale)
    print(f"{len(data)} batches of {args.batch} ({len(data) * args.batch} tokens); "
          f"{len(held)} held-out tokens; {torch.get_num_threads()} threads")
    t_ours, ours, never = run_ours(data, args.width, args.k, args.lr, mean, args.store)
    t_plain, plain = run_plain(data, args.width, args.k, args.lr)
    trained = {"ours": (t_ours, ours), "plain": (t_plain, plain)}
    if args.sparsify:
        from bench_vs_sparsify import run_sparsify

        trained["sparsify"] = run_sparsify(data, args.width, args.k, mean)
    if args.dictionary_learning:
        from bench_vs_sparsify import run_dictionary_learning

        trained["dictionary_learning"] = run_dictionary_learning(data, args.width, args.k)
    saes = [sae for _, sae in trained.values()]
    for sae in saes:
        sae.eval()
        sae.fold_input_scale(scale)  # all now act on raw activations
    eval_reader = ActivationReader(store, HOOK, held, 4096, shuffle=False, drop_last=False,
                                   exclude_token_ids=store.metadata["exclude_token_ids"])
    metrics = evaluate_saes(saes, eval_reader)
    loaded = load_model(ModelConfig(name=store.metadata["model_name"]))
    contexts = contexts_from_rows(store, held)
    spliced = spliced_loss(loaded, saes, HOOK, contexts, batch_size=8,
                           ignore_token_ids=store.metadata["exclude_token_ids"])
    tokens = len(data) * args.batch
    rows = {}
    for (name, (t, _)), m, s in zip(trained.items(), metrics, spliced):
        m.pop("log10_density")
        rows[name] = {"seconds": t, "tokens_per_s": tokens / t, **m, **s}
    rows["ours"]["never_fired_in_training"] = never
    rows["ratio_tokens_per_s"] = t_plain / t_ours
    print(f"\n| trainer | tokens/s | FVU | L0 | dead (eval) | loss recovered | KL | CE spliced |")
    print("|---|---|---|---|---|---|---|---|")
    for name in trained:
        r = rows[name]
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['fvu']:.3f} | {r['l0']:.1f} | "
              f"{r['dead_fraction']:.3f} | {r['loss_recovered']:.3f} | {r['kl_div']:.3f} | "
              f"{r['ce_spliced']:.3f} |")
    print(f"\nclean CE {rows['ours']['ce_clean']:.3f}, zero-ablation CE {rows['ours']['ce_zero']:.3f}; "
          f"ours / plain tokens/s = {rows['ratio_tokens_per_s']:.2f}")
    for name in trained:
        if name not in ("ours", "plain"):
            rows[f"ratio_over_{name}"] = rows[name]["seconds"] / t_ours
            print(f"ours / {name} tokens/s = {rows[f'ratio_over_{name}']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
