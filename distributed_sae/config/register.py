"""Register the typed configs in Hydra's ConfigStore.

`run_schema` is the schema of a whole job; each stage also has a group schema
(`model/base_model`, ...) that the presets in conf/<group>/ extend via their defaults lists.
"""

from hydra.core.config_store import ConfigStore

from distributed_sae.config import schema

_GROUPS = {
    "model": schema.ModelConfig,
    "data": schema.DataConfig,
    "harvest": schema.HarvestConfig,
    "store": schema.StoreConfig,
    "sae": schema.SAEConfig,
    "train": schema.TrainConfig,
    "eval": schema.EvalConfig,
    "export": schema.ExportConfig,
    "cluster": schema.ClusterConfig,
    "steer": schema.SteerConfig,
    "interp": schema.InterpConfig,
}


def register_configs() -> None:
    """Idempotent: ConfigStore entries are simply replaced on a second call."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=schema.RunConfig)
    for group, node in _GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)
