"""Ray: start a local instance or join a cluster, and check that a job's actors fit in it."""

from __future__ import annotations

import logging
import os

from distributed_sae.config import ClusterConfig, ConfigError

log = logging.getLogger(__name__)


def init_ray(cfg: ClusterConfig) -> None:
    """Start (or join) Ray once per process; later calls reuse the running instance.

    A local instance gets all CPUs unless cluster.num_cpus says otherwise; its dashboard is off
    (it costs ~100 MB and a port on laptops and CI machines).
    """
    import ray

    if ray.is_initialized():
        return
    if cfg.address:
        log.info("joining the Ray cluster at %s", cfg.address)
        ray.init(address=cfg.address, logging_level=logging.WARNING)
    else:
        num_cpus = cfg.num_cpus or local_cpus()
        log.info("starting a local Ray instance with %d CPUs", num_cpus)
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def local_cpus() -> int:
    """CPUs for a local Ray instance: a SLURM job's allocation (SLURM_CPUS_PER_TASK, else the
    CPUs it may run on), else the machine's."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return int(slurm)
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1


def ray_strategy(cfg: ClusterConfig, packed: bool = False) -> str:
    """Ray's scheduling strategy for actors and its placement strategy for Ray Train workers:
    SPREAD or PACK (cluster.placement; `packed` forces PACK, for workers that must share a
    node)."""
    return "PACK" if packed or cfg.placement == "pack" else "SPREAD"


def check_fits(n_actors: int, cpus: float, gpus: float, what: str, on_cluster: bool) -> None:
    """Refuse a local job whose actors could never all be scheduled (they would wait forever)."""
    import ray

    have = ray.cluster_resources()
    need_cpu, need_gpu = n_actors * cpus, n_actors * gpus
    short = need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0)
    if short and not on_cluster:
        raise ConfigError(
            f"{what}: {n_actors} actors x ({cpus} CPU, {gpus} GPU) need {need_cpu} CPUs and "
            f"{need_gpu} GPUs but the local Ray instance has {have.get('CPU', 0)} CPUs and "
            f"{have.get('GPU', 0)} GPUs: lower the actor count or the resources per actor")
    if short:
        log.warning("%s needs %s CPUs / %s GPUs; the cluster has %s now (waiting for autoscaling)",
                    what, need_cpu, need_gpu, have)
