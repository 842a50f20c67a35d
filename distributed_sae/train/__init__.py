"""Training: the bank trainer (one pass over the store feeds every member)."""

from distributed_sae.train.trainer import Member, build_members, lr_at, train, train_step

__all__ = ["Member", "build_members", "lr_at", "train", "train_step"]
