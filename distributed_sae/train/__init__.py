"""Training: the bank trainer (one pass over the store feeds every member), checkpoints,
schedules and neuron resampling."""

from distributed_sae.train.bank_trainer import BankTrainer, Member, lr_at, train_step
from distributed_sae.train.resampling import resample_dead
from distributed_sae.train.trainer import input_norm, input_scale, train

__all__ = ["BankTrainer", "Member", "input_norm", "input_scale", "lr_at", "resample_dead", "train",
           "train_step"]
