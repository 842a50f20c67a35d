"""Everything that knows about placement and world size: Ray clusters, process groups, DeepSpeed."""

from distributed_sae.parallel.cluster import check_fits, init_ray

__all__ = ["check_fits", "init_ray"]
