"""Training metrics: density histograms, the dead-feature window, and a real offline W&B run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_sparse_store
from test_train import make_cfg

from distributed_sae.train import train
from distributed_sae.train.metrics_log import DENSITY_EDGES, dead_fraction, density_histogram


def test_density_histogram_matches_numpy():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 500, (1000,), generator=g)
    counts[:37] = 0
    hist = density_histogram(counts, 10_000)
    fired = counts[counts > 0].double().numpy() / 10_000
    want, _ = np.histogram(np.log10(fired), bins=DENSITY_EDGES)
    assert hist["counts"] == want.tolist()
    assert hist["never"] == int((counts == 0).sum())  # >= 37: the draw has zeros of its own too
    assert sum(hist["counts"]) + hist["never"] == 1000


def test_density_histogram_of_nothing_seen():
    hist = density_histogram(torch.zeros(8, dtype=torch.long), 0)
    assert hist["never"] == 8 and sum(hist["counts"]) == 0


def test_dead_window_is_capped_by_tokens_seen():
    since = torch.tensor([0, 100, 900, 1000])
    # 1000 tokens seen: a latent silent for all of them is dead though the window is 10M.
    assert dead_fraction(since, 1000, 10_000_000) == 0.25
    # A window shorter than the run: silent for >= 500 tokens.
    assert dead_fraction(since, 1000, 500) == 0.5


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse_metrics") / "store"
    write_sparse_store(path, n_units=4)
    return str(path)


def test_training_logs_histograms_and_an_offline_wandb_run(store_path, tmp_path, monkeypatch):
    """A real wandb run in offline mode (W&B's servers cannot be reached here): the run's record
    file on disk must hold the metrics we logged."""
    pytest.importorskip("wandb", reason="wandb is a dev extra: pip install -e '.[dev]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(store_path, tmp_path, "topk", tokens=128 * 20, wandb_project="dsae-test")
    cfg.train.log_every = 10
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 10, 20, 20]
    for rec in lines:
        hist = rec["density_hist"]
        width = int(rec["member"].split("_w")[1].split("_")[0])
        assert sum(hist["counts"]) + hist["never"] == width
        assert sum(hist["counts"]) > 0  # TopK k=4 fires on every token
    import wandb

    wandb.teardown()  # stops W&B's writer process: its records are on disk after this
    runs = list((tmp_path / "train" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    raw = runs[0].read_bytes()
    assert b"topk_w96_k4_s0/fvu" in raw and b"log10_density" in raw
