"""Learning rates per kind, per member spec and from the config."""

from __future__ import annotations

import pytest
import torch
from test_train import HOOK, make_cfg, store_path  # noqa: F401  (module fixture)

from distributed_sae.config import ConfigError, TrainConfig
from distributed_sae.sae import member_lr, sae_member
from distributed_sae.train import BankTrainer


def test_learning_rate_per_kind_spec_and_config():
    unset = TrainConfig()
    assert unset.lr is None
    assert member_lr(sae_member(HOOK, "relu", 64, seed=0), unset) == 2e-4  # the kind's default
    assert member_lr(sae_member(HOOK, "topk", 64, seed=0, k=4), unset) == 1e-3
    assert member_lr(sae_member(HOOK, "relu", 64, seed=0), TrainConfig(lr=5e-4)) == 5e-4
    assert member_lr(sae_member(HOOK, "relu", 64, seed=0, lr=1e-5), TrainConfig(lr=5e-4)) == 1e-5
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=0.0)


def test_bank_members_step_at_their_own_learning_rates(store_path, tmp_path):  # noqa: F811
    cfg = make_cfg(store_path, tmp_path, "relu")
    cfg.train.lr, cfg.train.warmup_steps = None, 1
    specs = [sae_member(HOOK, "relu", 96, seed=0), sae_member(HOOK, "relu", 96, seed=1, lr=1e-3)]
    bank = BankTrainer(cfg, specs, 32, torch.zeros(32), 100)
    bank.step(torch.randn(128, 32))
    assert [m.opt.param_groups[0]["lr"] for m in bank.members] == [2e-4, 1e-3]
