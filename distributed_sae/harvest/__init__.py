"""Harvest: Ray actors run the model with hooks and write work units into the store."""

from distributed_sae.harvest.job import harvest, plan
from distributed_sae.harvest.pool import PoolResult, run_pool
from distributed_sae.harvest.worker import HarvestWorker, NonFiniteActivationError

__all__ = ["HarvestWorker", "NonFiniteActivationError", "PoolResult", "harvest", "plan", "run_pool"]
