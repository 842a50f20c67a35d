"""Typed configs of every stage (see schema.py) and their Hydra registration."""

from distributed_sae.config.errors import ConfigError
from distributed_sae.config.schema import (
    ClusterConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    HarvestConfig,
    InterpConfig,
    ModelBConfig,
    ModelConfig,
    RunConfig,
    SAEConfig,
    SteerConfig,
    StoreConfig,
    TrainConfig,
    parse_hook,
)

__all__ = [
    "ClusterConfig", "ConfigError", "DataConfig", "EvalConfig", "ExportConfig", "HarvestConfig", "InterpConfig",
    "ModelBConfig", "ModelConfig", "RunConfig", "SAEConfig", "SteerConfig", "StoreConfig", "TrainConfig", "parse_hook",
]
