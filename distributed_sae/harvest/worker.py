"""What a harvest actor does: hold the model once, turn work units into written store rows.

With a second model (RunConfig.model_b, model diffing) the actor holds both: each batch of token
ids runs through the first model for its hooks and through the second for the 'b/...' hooks, so
both models' activations of a token land in the same store row.

`HarvestWorker` is a plain class so that it can be tested without Ray; `harvest.job` wraps it with
`ray.remote` and the configured CPUs/GPUs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from distributed_sae.config import ModelConfig
from distributed_sae.config.checks import is_model_b
from distributed_sae.faults import fault_point
from distributed_sae.models import load_model, run_with_hooks
from distributed_sae.store import ActivationStore

log = logging.getLogger(__name__)


class NonFiniteActivationError(RuntimeError):
    """A unit produced NaN or Inf activations; retrying would give the same result."""


def unit_stats(x: torch.Tensor, keep: torch.Tensor) -> dict[str, Any]:
    """Sums for the store's running statistics over the kept rows of x (rows, d)."""
    kept = x[keep].double()  # (kept, d)
    return {"sum": kept.sum(0).tolist(), "sum_sq_norm": float(kept.pow(2).sum()),
            "count": int(kept.shape[0])}


def write_unit_checked(store: ActivationStore, unit: int, acts: dict[str, torch.Tensor],
                       contexts: np.ndarray, exclude: np.ndarray, where: str) -> dict[str, Any]:
    """Refuse non-finite activations, write the unit, return its commit record: statistics per
    hook, and each shard file's size and crc32c, against which reads and verify() check it.

    `where` says which model/rank produced the unit, for the error message.
    """
    token_ids = contexts.reshape(-1)  # (rows,)
    for hook, x in acts.items():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        if bad:
            raise NonFiniteActivationError(
                f"unit {unit}: {bad} rows of {hook} hold NaN or Inf ({where}); "
                f"try model.dtype=float32")
    files = store.write_unit(unit, acts, token_ids)
    keep = torch.from_numpy(~np.isin(token_ids, exclude))
    return {"stats": {h: unit_stats(x, keep) for h, x in acts.items()}, "files": files}


class HarvestWorker:
    """Runs forward passes with hooks and writes whole units into the store."""

    def __init__(self, model_cfg: ModelConfig, hooks: list[str], store_path: str,
                 batch_size: int, exclude_token_ids: list[int], threads: int = 1,
                 model_b: ModelConfig | None = None) -> None:
        torch.set_num_threads(max(1, threads))
        # The driver shows the one progress bar that matters; per-actor load bars (transformers'
        # and the GGUF dequantiser's own tqdm) only add noise. This process is the actor's alone.
        from transformers.utils import logging as hf_logging

        os.environ["TQDM_DISABLE"] = "1"
        hf_logging.disable_progress_bar()
        fault_point("harvest_load")
        self.loaded = load_model(model_cfg)
        self.hooks = list(hooks)
        # The second model is loaded only when a hook of it is harvested.
        self.hooks_b = [h for h in self.hooks if is_model_b(h)]
        if self.hooks_b and model_b is None:
            raise ValueError(f"hooks {self.hooks_b} are the second model's: pass model_b")
        self.loaded_b = load_model(model_b) if self.hooks_b and model_b else None
        self.batch_size = batch_size
        self.store = ActivationStore.open(store_path, mode="r+")
        self.exclude = np.asarray(exclude_token_ids, dtype=np.int64)

    def shutdown(self) -> None:
        """Release the model before the driver kills the actor (DeepSpeed workers also leave
        their process group here)."""
        self.loaded = None
        self.loaded_b = None

    def ready(self) -> bool:
        """Returns once the model is loaded (the driver waits on it to start the clock)."""
        return True

    def forward_unit(self, contexts: np.ndarray) -> dict[str, torch.Tensor]:
        """contexts (n_ctx, ctx) int64 -> hook -> (n_ctx * ctx, d) float32 activations; the
        'b/' hooks from the second model's pass over the same ids."""
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        hooks_a = [h for h in self.hooks if not is_model_b(h)]
        for i in range(0, len(contexts), self.batch_size):
            ids = torch.tensor(contexts[i:i + self.batch_size])  # (batch, ctx)
            # run_with_hooks moves the ids to each model's input device and parses 'b/' names
            # as the same layer and kind, keyed by the name given.
            out = run_with_hooks(self.loaded, ids, hooks_a)
            if self.loaded_b is not None:
                out.update(run_with_hooks(self.loaded_b, ids, self.hooks_b))
            for h in self.hooks:
                parts[h].append(out[h].reshape(-1, out[h].shape[-1]).float().cpu())
        return {h: torch.cat(p) for h, p in parts.items()}

    def _where(self) -> str:
        """Which model(s) produced a unit, for error messages."""
        where = f"model {self.loaded.name}, dtype {self.loaded.dtype}"
        if self.loaded_b is not None:
            where += f"; model_b {self.loaded_b.name}, dtype {self.loaded_b.dtype}"
        return where

    def run_unit(self, unit: int, contexts: np.ndarray) -> dict[str, Any] | None:
        """Harvest one unit and write it; returns the commit record (statistics per hook).

        unit < 0 is padding: the forward pass runs (a DeepSpeed group's ranks must make the same
        collective calls) but nothing is written and None is returned.
        """
        acts = self.forward_unit(contexts)
        if unit < 0:
            return None
        return write_unit_checked(self.store, unit, acts, contexts, self.exclude, self._where())
