"""Aligned batches of several hooks: the rows of one batch, read once per hook, for a whole bank.

A bank over hooks h1..hn needs, each step, the same token rows of every hook (members of
different hooks may then be compared token by token, and a member that reads one hook and
reconstructs another needs both of the same rows). One ActivationReader per hook, all with the
same rows, seed, batch size, excluded tokens, rank and world size, draw the same chunk order
(a function of seed and epoch) and the same row permutation of every buffer (a function of seed,
epoch, buffer and the rows kept, which depend only on the token ids): they stay in lockstep
without talking to each other. Each reads its own hook's bytes only, in its own prefetch
threads, so a batch of the bank reads every hook once.

The outlier filter (max_norm) keeps rows by their norm in one hook, which would break the
lockstep; it is accepted for a single hook only (the config refuses it for several).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch

from distributed_sae.store.activation_store import ActivationStore
from distributed_sae.store.reader import ActivationReader

Batch = dict[str, torch.Tensor]  # hook -> (batch, d_hook) float32, the same rows in every hook


def cat_hooks(batch: Mapping[str, torch.Tensor], hooks: Sequence[str]) -> torch.Tensor:
    """(batch, sum of the hooks' widths): the hooks' rows side by side, in order (what a member
    reading or writing several hooks sees); one hook: the batch's own tensor, no copy."""
    if len(hooks) == 1:
        return batch[hooks[0]]
    return torch.cat([batch[h] for h in hooks], 1)


class BankReader:
    """Batches of every hook of `hooks` over the same rows; `scales` per hook (input norm)."""

    def __init__(self, store: ActivationStore, hooks: Sequence[str], rows: range, batch_size: int,
                 *, seed: int, scales: Mapping[str, float],
                 exclude_token_ids: Sequence[int] = (), max_norm: float | None = None,
                 rank: int = 0, world_size: int = 1, **reader_kwargs: Any) -> None:
        hooks = list(dict.fromkeys(hooks))
        if not hooks:
            raise ValueError("a bank reader needs at least one hook")
        if max_norm is not None and len(hooks) > 1:
            raise ValueError(f"max_norm={max_norm} drops rows by one hook's norm: with hooks "
                             f"{hooks} the hooks' batches would differ; read one hook")
        self.hooks = hooks
        self.readers = {h: ActivationReader(store, h, rows, batch_size, seed=seed,
                                            scale=scales[h], max_norm=max_norm,
                                            exclude_token_ids=exclude_token_ids, rank=rank,
                                            world_size=world_size, **reader_kwargs)
                        for h in hooks}

    def iter_batches(self) -> Iterator[Batch]:
        """Endless aligned batches (see ActivationReader.iter_batches)."""
        streams = [(h, r.iter_batches()) for h, r in self.readers.items()]
        while True:
            yield {h: next(s) for h, s in streams}

    def iter_epoch(self, epoch: int) -> Iterator[Batch]:
        """The aligned batches of one epoch."""
        for parts in zip(*(r.iter_epoch(epoch) for r in self.readers.values())):
            yield dict(zip(self.hooks, parts))

    def state_dict(self) -> dict[str, Any]:
        """Every hook's reader position (identical positions: kept per hook to check on load)."""
        return {"hooks": {h: r.state_dict() for h, r in self.readers.items()}}

    def rows_ledger(self) -> tuple[int, str]:
        """(rows yielded, digest hex) of the bank's batches (ActivationReader.rows_ledger): the
        hooks' readers yield the same rows, so one ledger stands for all of them."""
        ledgers = {h: r.rows_ledger() for h, r in self.readers.items()}
        first = ledgers[self.hooks[0]]
        if any(other != first for other in ledgers.values()):  # lockstep broken: never expected
            raise RuntimeError(f"the hooks' readers yielded different rows: ledgers {ledgers}")
        return first

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at `state`; a single-hook reader's own state (older checkpoints) is accepted
        for a bank of that one hook."""
        per_hook = state.get("hooks")
        if per_hook is None:
            if len(self.hooks) != 1:
                raise ValueError(f"the saved reader position is of one hook "
                                 f"({state.get('hook')!r}); this bank reads {self.hooks}")
            per_hook = {self.hooks[0]: state}
        if sorted(per_hook) != sorted(self.hooks):
            raise ValueError(f"the saved reader position covers hooks {sorted(per_hook)}, this "
                             f"bank reads {sorted(self.hooks)}: resume with the same sae.hooks")
        for h, r in self.readers.items():
            r.load_state_dict(per_hook[h])
