"""Everything that knows about placement and world size: Ray clusters, process groups, DeepSpeed."""

from distributed_sae.parallel.cluster import check_fits, init_ray
from distributed_sae.parallel.process_group import (
    default_backend,
    destroy_group,
    free_port,
    init_group,
    rendezvous_address,
)

__all__ = ["check_fits", "default_backend", "destroy_group", "free_port", "init_group", "init_ray",
           "rendezvous_address"]
