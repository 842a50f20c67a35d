"""Training metrics on rank 0: the console, out_dir/train/metrics.jsonl, and optionally W&B.

Every `train.log_every` steps each member gets one JSON line: its loss terms, FVU, dead fraction,
lr, tokens/s and a histogram of log10 feature density over the tokens since the previous line
(the plot *Towards Monosemanticity* reads dictionaries by: a healthy one has a bump well above
-5 and few features below it). Dead = not fired in the last `train.dead_report_tokens` tokens
(10M, as Gao et al. 2024), or in all tokens seen when fewer have been seen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from distributed_sae.config import RunConfig

log = logging.getLogger(__name__)

# log10 density bins: 1e-8 .. 1, half a decade wide. Features that never fired in the window
# are counted apart (`never`), since log10(0) has no bin.
DENSITY_EDGES = [x / 2 for x in range(-16, 1)]


def density_histogram(counts: torch.Tensor, tokens: int) -> dict[str, Any]:
    """Histogram of log10(counts / tokens) over the latents that fired; counts (d_sae,)."""
    fired = counts[counts > 0].double()
    if tokens <= 0 or fired.numel() == 0:
        return {"edges": DENSITY_EDGES, "counts": [0] * (len(DENSITY_EDGES) - 1),
                "never": int(counts.numel())}
    logd = (fired / tokens).log10().clamp(DENSITY_EDGES[0], DENSITY_EDGES[-1])
    hist = torch.histogram(logd, bins=torch.tensor(DENSITY_EDGES, dtype=torch.float64))
    return {"edges": DENSITY_EDGES, "counts": [int(c) for c in hist.hist.tolist()],
            "never": int((counts == 0).sum())}


def dead_fraction(since_fired: torch.Tensor, tokens_seen: int, window: int) -> float:
    """Fraction of latents not fired in the last min(window, tokens_seen) tokens."""
    return float((since_fired >= min(window, max(tokens_seen, 1))).float().mean())


def member_records(bank: Any, rate: float, cfg: RunConfig,
                   members: list[Any] | None = None) -> list[dict[str, Any]]:
    """One JSON-able record per member (default: all of `bank`, a BankTrainer); starts the
    members' next density window."""
    records = []
    for m in bank.members if members is None else members:
        counts, tokens = m.take_density()
        lr = m.opt.param_groups[0]["lr"]
        dead = dead_fraction(m.since_fired, bank.tokens_seen, cfg.train.dead_report_tokens)
        records.append({"step": bank.step_count, "tokens": bank.tokens_seen,
                        "member": m.spec.member_id, **m.last, "dead_fraction": dead,
                        "lr": lr, "tokens_per_s": rate,
                        "density_hist": density_histogram(counts, tokens)})
    return records


class MetricsLog:
    """The sinks of training metrics; build on rank 0 only, `close()` at the end."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.out_dir) / "train" / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = _start_wandb(cfg) if cfg.train.wandb_project else None

    def write(self, bank: Any, rate: float) -> list[dict[str, Any]]:
        """Log one record per member of `bank` (a BankTrainer) at its current step."""
        records = member_records(bank, rate, self.cfg)
        self.emit(records, bank.step_count)
        return records

    def emit(self, records: list[dict[str, Any]], step: int) -> None:
        """Log records built by `member_records` (on any rank) to every sink."""
        for r in records:
            terms = " ".join(f"{k} {v:.4g}" for k, v in r.items()
                             if k in ("loss", "fvu", "mse", "auxk", "l1", "l0", "aux_mse"))
            log.info("step %d %s %s dead %.3f (%.0f tok/s)", step, r["member"], terms,
                     r["dead_fraction"], r["tokens_per_s"])
        with open(self.path, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        if self._wandb is not None:
            self._log_wandb(records, step)

    def _log_wandb(self, records: list[dict[str, Any]], step: int) -> None:
        import wandb

        data: dict[str, Any] = {}
        for r in records:
            name = r["member"]
            data.update({f"{name}/{k}": v for k, v in r.items()
                         if isinstance(v, (int, float)) and k not in ("step",)})
            hist = r["density_hist"]
            if sum(hist["counts"]):
                data[f"{name}/log10_density"] = wandb.Histogram(
                    np_histogram=(hist["counts"], hist["edges"]))
        self._wandb.log(data, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg: RunConfig) -> Any:
    """A W&B run (WANDB_MODE=offline keeps it on disk; the API key comes from the environment)."""
    try:
        import wandb
    except ImportError:
        raise ImportError(f"train.wandb_project={cfg.train.wandb_project!r} needs the wandb "
                          f"package: pip install 'distributed-sae[wandb]', or unset "
                          f"train.wandb_project") from None
    run_dir = Path(cfg.out_dir) / "train"
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.train.wandb_project, entity=cfg.train.wandb_entity,
                      name=cfg.train.wandb_run_name, dir=str(run_dir),
                      config={"sae": vars(cfg.sae), "train": vars(cfg.train),
                              "model": cfg.model.name, "hooks": cfg.sae_hooks},
                      resume="allow")

