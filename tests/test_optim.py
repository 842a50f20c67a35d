"""train.optimizer=signum_sf: sparsify's schedule-free Signum, bit for bit, in the one engine."""

from __future__ import annotations

import pytest
import torch
from test_train import (HOOK, assert_same_weights, crash_then_resume, make_cfg,  # noqa: F401
                        store_path)  # store_path: the module fixture

from distributed_sae.config import ConfigError, TrainConfig
from distributed_sae.eval import evaluate
from distributed_sae.sae import ReLUSAE, sae_member
from distributed_sae.train import BankTrainer, lr_at, resample_dead, train
from distributed_sae.train.optim import (ADAM_DEAD_TOKENS, SIGNUM_DEAD_TOKENS, SIGNUM_ENCODER_NORM,
                                         ScheduleFreeSignum, build_optimizer, dead_window,
                                         member_optimizer, peak_lr, scheduled)


class SignSGD(torch.optim.Optimizer):
    """sparsify 1.3.3's SignSGD (sign_sgd.py), the base its Trainer wraps in ScheduleFree."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.ReLU(), torch.nn.Linear(13, 5))


def test_schedule_free_signum_is_the_schedulefree_wrapper_bit_for_bit():
    schedulefree = pytest.importorskip("schedulefree", reason="pip install schedulefree (dev)")
    ours, ref = _model(0), _model(0)
    opt = ScheduleFreeSignum(ours.parameters(), lr=1e-2, momentum=0.95)
    ref_opt = schedulefree.ScheduleFreeWrapper(SignSGD(ref.parameters(), lr=1e-2), momentum=0.95)
    ref_opt.train()
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        lr = 1e-2 * min(1.0, (step + 1) / 5)  # a warm-up: lr_max weighting of the average
        x, y = torch.randn(16, 7, generator=gen), torch.randn(16, 5, generator=gen)
        for model, o in ((ours, opt), (ref, ref_opt)):
            for group in o.param_groups:
                group["lr"] = lr
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a, b), step  # y, where the gradients are taken
    opt.eval()
    ref_opt.eval()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)  # x, the averaged weights that are saved
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()


def test_eval_moves_to_the_average_and_a_checkpoint_restores_the_state():
    model = _model(0)
    opt = ScheduleFreeSignum(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(8, 7, generator=gen)).pow(2).mean().backward()
        opt.step()
    y = [p.detach().clone() for p in model.parameters()]
    state = opt.state_dict()
    opt.eval()
    x = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(x, y))
    opt.train()
    for a, b in zip(model.parameters(), y):
        torch.testing.assert_close(a, b)  # y -> x -> y within rounding
    fresh = ScheduleFreeSignum(_model(1).parameters(), lr=1.0)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["k"] == 10 and fresh.param_groups[0]["lr"] == 1e-2
    assert fresh.param_groups[0]["train_mode"]


def test_signum_sf_defaults_config_errors_and_constant_lr(store_path, tmp_path):  # noqa: F811
    cfg = make_cfg(store_path, tmp_path, optimizer="signum_sf")
    cfg.train.lr = None
    spec = sae_member(HOOK, "topk", 4096, seed=0, k=4)
    assert peak_lr(spec, cfg) == pytest.approx(5e-3 / 0.5)  # 5e-3 / sqrt(4096 / 2^14)
    cfg.train.lr = 3e-3
    assert peak_lr(spec, cfg) == 3e-3
    opt = build_optimizer(_model(1).parameters(), spec, cfg, 1e-2, fused=False)
    constant = not scheduled(opt)
    assert [lr_at(s, 100, cfg, 1e-2, constant) for s in (0, 50, 99)] == [1e-2] * 3  # no warm-up
    with pytest.raises(ConfigError,
                       match=r"train.optimizer='sgd' is not one of auto, adam, signum_sf"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="signum_sf with train.data_parallel=zero2"):
        TrainConfig(optimizer="signum_sf", data_parallel="zero2", workers=2)
    with pytest.raises(ConfigError, match="train.signum_momentum=1.0"):
        TrainConfig(signum_momentum=1.0)
    bank = BankTrainer(cfg, [spec], 32, torch.zeros(32), 10)
    assert isinstance(bank.members[0].opt, ScheduleFreeSignum)


def test_signum_sf_learns_saves_averages_and_resumes_bit_identically(store_path, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    clean = make_cfg(store_path, tmp_path / "clean", tokens=128 * 300, optimizer="signum_sf",
                     checkpoint_every=100)
    train(clean)
    for name, m in evaluate(clean).items():
        assert m["fvu"] < 0.5, (name, m["fvu"])  # the mean predictor scores 1.0
    crashed = make_cfg(store_path, tmp_path / "crashed", tokens=128 * 300,
                       optimizer="signum_sf", checkpoint_every=100)
    crash_then_resume(crashed, 150, monkeypatch, expect_checkpoint="step_000000100")
    assert_same_weights(tmp_path / "clean", tmp_path / "crashed")


def test_resampled_features_restart_the_average():
    sae = ReLUSAE(8, 16, seed=0)
    opt = ScheduleFreeSignum(sae.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        opt.zero_grad()
        sae.loss(torch.randn(32, 8, generator=gen)).loss.backward()
        opt.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 9]] = True
    assert resample_dead(sae, opt, torch.randn(64, 8, generator=gen), dead, gen) == 2
    z = opt.state[sae.W_dec]["z"]
    assert torch.equal(z[dead], sae.W_dec[dead]) and not torch.equal(z[~dead], sae.W_dec[~dead])
    opt.eval()  # y = z there, so x = y too: the new feature is its own average
    torch.testing.assert_close(sae.W_dec[dead], z[dead])


def test_auto_picks_signum_for_k_kinds_and_adam_elsewhere(store_path, tmp_path):  # noqa: F811
    cfg = make_cfg(store_path, tmp_path)
    assert cfg.train.optimizer == "auto"
    picks = {kind: member_optimizer(sae_member(HOOK, kind, 64, seed=0, **(
        {"k": 4} if kind in ("topk", "batchtopk", "matryoshka") else {})), cfg)
             for kind in ("topk", "batchtopk", "matryoshka", "relu", "gated", "jumprelu")}
    assert picks == {"topk": "signum_sf", "batchtopk": "signum_sf", "matryoshka": "signum_sf",
                     "relu": "adam", "gated": "adam", "jumprelu": "adam"}
    bank = BankTrainer(cfg, [sae_member(HOOK, "topk", 64, seed=0, k=4),
                             sae_member(HOOK, "relu", 64, seed=0)], 16, torch.zeros(16), 10)
    assert [type(m.opt).__name__ for m in bank.members] == ["ScheduleFreeSignum", "Adam"]
    cfg.train.optimizer = "adam"  # today's behaviour stays one key away
    assert member_optimizer(sae_member(HOOK, "topk", 64, seed=0, k=4), cfg) == "adam"
    zero2 = TrainConfig(data_parallel="zero2", workers=2)  # auto under ZeRO-2: Adam, no error
    cfg.train = zero2
    assert member_optimizer(sae_member(HOOK, "topk", 64, seed=0, k=4), cfg) == "adam"


def test_encoder_init_norm_follows_the_optimiser_unless_set(store_path, tmp_path):  # noqa: F811
    from distributed_sae.config import SAEConfig
    with pytest.raises(ConfigError, match=r"sae.encoder_init_norm=0.0 must be positive"):
        SAEConfig(encoder_init_norm=0.0)
    specs = [sae_member(HOOK, "topk", 64, seed=0, k=4), sae_member(HOOK, "relu", 64, seed=0)]

    def start_norms(cfg):
        bank = BankTrainer(cfg, specs, 16, torch.zeros(16), 10)
        return [m.sae.W_enc.norm(dim=0) for m in bank.members]  # (d_sae,) per member

    signum, adam = start_norms(make_cfg(store_path, tmp_path))  # auto: signum_sf, then Adam
    assert torch.allclose(signum, torch.full_like(signum, SIGNUM_ENCODER_NORM), atol=1e-6)
    assert torch.allclose(adam, torch.ones_like(adam), atol=1e-6)
    cfg = make_cfg(store_path, tmp_path)
    cfg.sae.encoder_init_norm = 0.25
    assert all(torch.allclose(n, torch.full_like(n, 0.25), atol=1e-6) for n in start_norms(cfg))


def test_auxk_window_follows_the_optimiser_unless_set(store_path, tmp_path):  # noqa: F811
    specs = [sae_member(HOOK, "topk", 64, seed=0, k=4), sae_member(HOOK, "relu", 64, seed=0)]
    cfg = make_cfg(store_path, tmp_path)
    cfg.train.dead_tokens = None  # make_cfg sets 4096
    bank = BankTrainer(cfg, specs, 16, torch.zeros(16), 10)
    assert [m.dead_tokens for m in bank.members] == [SIGNUM_DEAD_TOKENS, ADAM_DEAD_TOKENS]
    assert (SIGNUM_DEAD_TOKENS, ADAM_DEAD_TOKENS) == (10_000_000, 50_000)
    cfg.train.dead_tokens = 4096
    assert [dead_window(s, cfg) for s in specs] == [4096, 4096]
    with pytest.raises(ConfigError, match=r"train.dead_tokens"):
        TrainConfig(dead_tokens=0)


def test_saved_average_gets_unit_decoder_rows_unless_turned_off(store_path, tmp_path):  # noqa: F811
    from distributed_sae.train.optim import to_saved
    specs = [sae_member(HOOK, "topk", 64, seed=0, k=4), sae_member(HOOK, "relu", 64, seed=0)]
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(128, 16, generator=gen) for _ in range(20)]

    def trained(unit: bool) -> BankTrainer:
        cfg = make_cfg(store_path, tmp_path)  # auto: signum_sf for topk, Adam for relu
        cfg.train.signum_unit_decoder = unit
        bank = BankTrainer(cfg, specs, 16, torch.zeros(16), len(batches))
        for x in batches:
            bank.step(x, record=False)
        to_saved(bank.members, unit)
        return bank

    raw, unit = trained(False), trained(True)
    raw_norms = raw.members[0].sae.W_dec.norm(dim=1)  # (d_sae,): the average of turning rows
    assert (raw_norms - 1).abs().max() > 1e-4, raw_norms  # off the unit sphere
    torch.testing.assert_close(unit.members[0].sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(unit.members[0].sae.W_dec, raw.members[0].sae.W_dec
                               / raw_norms[:, None])  # directions kept, only the length changes
    assert torch.equal(unit.members[0].sae.W_enc, raw.members[0].sae.W_enc)
    assert torch.equal(unit.members[1].sae.W_dec, raw.members[1].sae.W_dec)  # Adam: untouched
