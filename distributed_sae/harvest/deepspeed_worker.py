"""A harvest actor that holds one rank's share of a model partitioned by DeepSpeed ZeRO-3.

`group_size` actors form one torch.distributed group and one model: ZeRO-3 keeps 1/group_size of
every parameter on each rank and all-gathers a module's weights just before it runs. Each rank
feeds its *own* contexts (a data-parallel forward over partitioned weights), so a group harvests
group_size units per round with 1/group_size of the weights per actor.

Two rules follow from the all-gathers being collective:

* every rank of a group makes the same number of forward passes, in lockstep: units have equal
  size, and the driver pads a group's last round with `run_unit(-1, contexts)` (forward, no write);
* the forward is never cut short by an exception (`run_with_hooks`' early stop): one raised
  mid-forward skips ZeRO-3's post-forward hooks. Instead the model is cut structurally before
  `deepspeed.initialize` (`truncate_layers`), so layers above the deepest hook do not exist.

No optimizer is configured: ZeRO-3 is used only for partitioned parameters (and an optimizer such
as Adam would JIT-compile fused_adam, ~37 s). DeepSpeed's `init_inference` is no alternative here:
its kernel injection is not implemented on CPU and its tensor parallelism segfaulted with two CPU
processes (DeepSpeed 0.19.8).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import numpy as np
import torch

from distributed_sae.config import ModelConfig, parse_hook
from distributed_sae.harvest.worker import write_unit_checked
from distributed_sae.models import LoadedModel, load_model, run_with_hooks
from distributed_sae.models.registry import truncate_layers
from distributed_sae.parallel.process_group import destroy_group, init_group, rendezvous_address
from distributed_sae.store import ActivationStore

log = logging.getLogger(__name__)

# DeepSpeed's own default: parameters with fewer elements stay whole on every rank (norms, biases),
# which saves an all-gather per small tensor at a negligible memory cost. 0 partitions everything.
PERSISTENCE_THRESHOLD = 100_000


def _quiet_deepspeed() -> None:
    """Environment for DeepSpeed on this process, set before it is first imported."""
    # A stable JIT cache, so an op compiled once is reused by later actors and runs.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # picked anyway; set to silence its warning


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op (~30 s cold).

    That op only serves tensor-parallel inference all-reduces; ZeRO-3 uses torch.distributed's
    gloo all-gather, so the build is pure start-up cost (and needs a C++ compiler). DeepSpeed
    builds it whenever `__compatible_ops__` says it can; marking it incompatible skips it.
    """
    if torch.cuda.is_available():
        return
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError) as err:  # another DeepSpeed layout: just build
        log.debug("could not skip the shm comm build: %s", err)


def ds_config(dtype: torch.dtype, persistence_threshold: int = PERSISTENCE_THRESHOLD) -> dict[str, Any]:
    """The DeepSpeed config of a forward-only ZeRO-3 model in `dtype` (no optimizer)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed, unused without training
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence_threshold},
        "steps_per_print": 2**31 - 1,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    return config


def partition_model(loaded: LoadedModel, hooks: list[str],
                    persistence_threshold: int = PERSISTENCE_THRESHOLD) -> LoadedModel:
    """`loaded` cut to the layers `hooks` need, rebuilt and partitioned by ZeRO-3 over the group.

    Needs the torch.distributed group formed (`init_group`). Every rank passes the same weights.
    """
    _quiet_deepspeed()
    _skip_shm_comm_build()
    import deepspeed

    n_keep = 1 + max(parse_hook(h)[0] for h in hooks)
    # Rebuilt from its config: also turns a GGUF-loaded model into a plain one DeepSpeed accepts.
    cut = truncate_layers(loaded, n_keep)
    engine, *_ = deepspeed.initialize(
        model=cut.model, config=ds_config(cut.dtype, persistence_threshold))
    # run_with_hooks calls the bare module, whose own ZeRO-3 hooks gather and release weights.
    cut.model = engine.module.eval()
    return cut


class DeepSpeedHarvestWorker:
    """One rank of a ZeRO-3 harvest group; the public interface of `HarvestWorker` plus the group.

    Made in two steps because rank 0's node must pick the rendezvous port: the constructor only
    opens the store; `rendezvous()` (rank 0) gives (addr, port); `join(addr, port)` (every rank)
    forms the group, loads and partitions the model. `create_deepspeed_group` does all of it.
    """

    def __init__(self, model_cfg: ModelConfig, hooks: list[str], store_path: str,
                 batch_size: int, exclude_token_ids: list[int], rank: int, world_size: int,
                 threads: int = 1, persistence_threshold: int = PERSISTENCE_THRESHOLD) -> None:
        _quiet_deepspeed()
        torch.set_num_threads(max(1, threads))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model_cfg = model_cfg
        self.hooks = list(hooks)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.persistence_threshold = persistence_threshold
        self.store = ActivationStore.open(store_path, mode="r+")
        self.exclude = np.asarray(exclude_token_ids, dtype=np.int64)
        self.loaded: Optional[LoadedModel] = None
        self._error: Optional[BaseException] = None

    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) of this actor's node; called on rank 0 only."""
        return rendezvous_address()

    def join(self, addr: str, port: int) -> None:
        """Form the group with the other ranks, then load the model and partition it over them."""
        try:
            start = time.perf_counter()
            init_group(self.rank, self.world_size, addr, port)
            # Each rank loads the whole model before ZeRO-3 partitions it: peak host memory is
            # one full model per rank (fine for models that fit one host; see docs for zero.Init).
            full = load_model(self.model_cfg)
            self.loaded = partition_model(full, self.hooks, self.persistence_threshold)
            del full
            log.info("rank %d/%d ready in %.1f s", self.rank, self.world_size,
                     time.perf_counter() - start)
        except BaseException as err:  # kept for ready(), which the driver waits on
            self._error = err
            raise

    def ready(self) -> bool:
        """Returns once the group is formed and the model partitioned; raises if that failed."""
        if self._error is not None:
            raise RuntimeError(f"rank {self.rank} failed to join its group: {self._error!r}") from self._error
        if self.loaded is None:
            raise RuntimeError(f"rank {self.rank}: join() was never called")
        return True

    def partition_info(self) -> dict[str, int]:
        """Parameter elements of the (cut) model: 'total'; 'local', this rank's partitions;
        'persistent', those of the small parameters that every rank also keeps whole."""
        assert self.loaded is not None, "join() first"
        params = list(self.loaded.model.parameters())
        return {"total": sum(int(p.ds_numel) for p in params),
                "local": sum(int(p.ds_tensor.numel()) for p in params),
                "persistent": sum(int(p.ds_numel) for p in params if p.ds_persist)}

    def forward_unit(self, contexts: np.ndarray) -> dict[str, torch.Tensor]:
        """contexts (n_ctx, ctx) int64 -> hook -> (n_ctx * ctx, d) float32 activations.

        Collective: every rank of the group must call it with the same n_ctx at the same time.
        """
        assert self.loaded is not None, "join() first"
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        for i in range(0, len(contexts), self.batch_size):
            ids = torch.tensor(contexts[i:i + self.batch_size])  # (batch, ctx)
            out = run_with_hooks(self.loaded, ids, self.hooks, stop_early=False)
            for h in self.hooks:
                parts[h].append(out[h].reshape(-1, out[h].shape[-1]).float().cpu())
        return {h: torch.cat(p) for h, p in parts.items()}

    def run_unit(self, unit: int, contexts: np.ndarray) -> Optional[dict[str, Any]]:
        """Harvest one unit and write it; returns the commit record (statistics per hook).

        unit < 0 is padding: the forward runs (the group's all-gathers need every rank) and
        nothing is written; returns None.
        """
        acts = self.forward_unit(contexts)
        if unit < 0:
            return None
        where = (f"model {self.model_cfg.name}, dtype {self.model_cfg.dtype}, "
                 f"DeepSpeed rank {self.rank}")
        return write_unit_checked(self.store, unit, acts, contexts, self.exclude, where)

    def shutdown(self) -> None:
        """Leave the process group (call on every rank before the actor is killed, if it can be)."""
        destroy_group()


def create_deepspeed_group(model_cfg: ModelConfig, hooks: list[str], store_path: str,
                           batch_size: int, exclude_token_ids: list[int], group_size: int,
                           cpus_per_actor: float, gpus_per_actor: float,
                           persistence_threshold: int = PERSISTENCE_THRESHOLD) -> list[Any]:
    """Start `group_size` Ray actors that form one ZeRO-3 group; returns their handles by rank.

    Returns without waiting: the group is being formed. Call `ready()` on every handle (it raises
    if forming the group or loading failed), then `run_unit` on every rank in lockstep.
    """
    import ray

    remote = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)(DeepSpeedHarvestWorker)
    threads = max(1, int(cpus_per_actor))
    actors = [remote.remote(model_cfg, hooks, store_path, batch_size, exclude_token_ids, rank,
                            group_size, threads=threads, persistence_threshold=persistence_threshold)
              for rank in range(group_size)]
    addr, port = ray.get(actors[0].rendezvous.remote())
    for actor in actors:  # not awaited: each join blocks until all ranks joined
        actor.join.remote(addr, port)
    log.info("DeepSpeed group of %d actors rendezvous at %s:%d", group_size, addr, port)
    return actors
