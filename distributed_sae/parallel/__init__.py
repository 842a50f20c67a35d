"""Everything that knows about placement and world size: Ray clusters, process groups, DeepSpeed."""

from distributed_sae.parallel.cluster import check_fits, init_ray
from distributed_sae.parallel.process_group import (
    default_backend,
    destroy_group,
    free_port,
    init_group,
    rendezvous_address,
)

from distributed_sae.parallel.collectives import CommStats, ShardComm
from distributed_sae.parallel.latent_shard import LatentShardedSAE, shard_range
from distributed_sae.parallel.layout import LayoutGroups, ParallelLayout
from distributed_sae.parallel.shard_checkpoint import gather_full, load_sharded, save_sharded

__all__ = ["CommStats", "LatentShardedSAE", "LayoutGroups", "ParallelLayout", "ShardComm",
           "check_fits", "default_backend", "destroy_group", "free_port", "gather_full",
           "init_group", "init_ray", "load_sharded", "rendezvous_address", "save_sharded",
           "shard_range"]
