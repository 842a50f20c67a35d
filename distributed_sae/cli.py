"""Hydra entry points: compose -> typed RunConfig -> start-up checks -> the stage.

    dsae-harvest   model -> store            dsae-eval     train/ + store -> eval/
    dsae-train     store -> out_dir/train    dsae-export   train/ + eval/ -> export/
    dsae-run       all four in order (stream=true: harvest and train at once, then the rest)
    dsae-steer     a trained member's feature added at its hook while the model generates
    dsae-interp    train/ + store -> interp/: LLM explanations and scores, features vs neurons

Each stage reads the previous stage's output, so stages can run one by one with the same
`out_dir=` (and `store.path=`). Under --multirun each job gets its own out_dir (the sweep's job
folder); point store.path at one folder to share a store across a sweep.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from distributed_sae.config import ConfigError, RunConfig
from distributed_sae.config.overrides import check_overrides, user_overrides
from distributed_sae.config.register import register_configs

if TYPE_CHECKING:  # importing the store loads torch and zarr, which --help should not pay for
    from distributed_sae.store import ActivationStore

log = logging.getLogger("distributed_sae")

CONFIG_PATH = "pkg://distributed_sae.conf"
CONFIG_NAME = "config"

# User errors that get a one-line message and exit status 2 instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)
# Also user errors, named here rather than imported: importing distributed_sae.store loads torch
# and zarr, which `dsae-export --help` should not pay for; a module that raised one is loaded.
LAZY_USER_ERRORS = (("distributed_sae.store.integrity", "StoreDamagedError"),)


def is_user_error(err: BaseException) -> bool:
    """Whether `err` gets a one-line message (USER_ERRORS, LAZY_USER_ERRORS, a full disk)."""
    lazy = tuple(getattr(sys.modules[mod], name) for mod, name in LAZY_USER_ERRORS
                 if mod in sys.modules)
    return isinstance(err, USER_ERRORS + lazy) or _disk_full(err) is not None


def _disk_full(err: BaseException) -> str | None:
    """The one-line message of a full disk (store/integrity.py), or None for any other error.
    safetensors' writer raises its own SafetensorError, errno only in the text."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        full = err
    elif os.strerror(errno.ENOSPC) in str(err):
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        return None
    from distributed_sae.store.integrity import disk_full_message

    return disk_full_message(full)


def to_run_config(dcfg: DictConfig) -> RunConfig:
    """DictConfig -> RunConfig, running every dataclass's __post_init__ validation."""
    try:
        run = OmegaConf.to_object(dcfg)
    except Exception as err:  # OmegaConf wraps errors raised in __post_init__
        cause = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or err) from None
    assert isinstance(run, RunConfig), type(run)
    return run


def check_model(cfg: RunConfig) -> None:
    """The harvest's checks that need the model's shape (read from its config, weights are not
    loaded) or its device, run before Ray starts."""
    from distributed_sae.config.checks import is_model_b
    from distributed_sae.harvest.job import actor_gpus
    from distributed_sae.models import check_hooks, model_dims

    hooks = list(cfg.harvest.hooks)
    check_hooks([h for h in hooks if not is_model_b(h)], model_dims(cfg.model)[0])
    if cfg.harvests_model_b:  # the 'b/' hooks against the second model's layers
        check_hooks([h for h in hooks if is_model_b(h)], model_dims(cfg.model_b)[0])
    actor_gpus(cfg)  # refuses a model.device that Ray's GPU placement cannot give an actor


def _wanted_hooks(cfg: RunConfig) -> list[tuple[str, str]]:
    """(config key, hook) for every hook the bank reads: RunConfig.sae_hooks under the key that
    set them, then the inputs of explicit sae.members (which may name their own hooks)."""
    key = "sae.hooks" if cfg.sae.hooks else "sae.hook" if cfg.sae.hook else "harvest.hooks"
    wanted = [(key, h) for h in cfg.sae_hooks]
    if cfg.sae.members:
        wanted += [(f"sae.members[{i}]", h)
                   for i, spec in enumerate(cfg.bank()) for h in spec.hooks]
    return wanted


def check_store(cfg: RunConfig) -> None:
    """The store at store.path exists, holds activations of model.name, and every hook the bank
    reads: what train and eval read, checked before either starts Ray or loads a model."""
    from distributed_sae.store import ActivationStore

    path = Path(cfg.store.path)
    if not (path / "zarr.json").is_file():
        raise ConfigError(f"store.path={cfg.store.path} holds no activation store: run "
                          f"dsae-harvest store.path={cfg.store.path} first, or point store.path "
                          f"at an existing store")
    store = ActivationStore.open(path)
    model = store.metadata.get("model_name")
    if model != cfg.model.name:  # exact, as eval compares: a built-in name is its own name
        raise ConfigError(f"store {path} holds activations of {model!r} but model.name="
                          f"{cfg.model.name!r}: set model.name={model}, or point store.path at a "
                          f"store of {cfg.model.name}")
    _check_store_model_b(cfg, store)
    stored = store.hook_points
    for key, hook in _wanted_hooks(cfg):
        if hook not in stored:
            raise ConfigError(
                f"store {path} holds hooks [{','.join(stored)}]; {key} wants {hook}: "
                f"harvest it (dsae-harvest harvest.hooks=[{hook}] into another store.path) or "
                f"choose a stored hook (harvest.hooks=[{','.join(stored)}])")


def _check_store_model_b(cfg: RunConfig, store: ActivationStore) -> None:
    """A bank that reads the second model's hooks ('b/...') needs a store of model_b.name."""
    from distributed_sae.config.checks import is_model_b

    if not any(is_model_b(h) for _, h in _wanted_hooks(cfg)):
        return
    stored = store.metadata.get("model_b_name")
    if stored != cfg.model_b.name:
        raise ConfigError(f"store {store.path} holds second-model activations of {stored!r} "
                          f"but model_b.name={cfg.model_b.name!r}: set model_b.name={stored}, or "
                          f"point store.path at a store harvested with model_b.name="
                          f"{cfg.model_b.name}")


def _stage_fn(name: str) -> Callable[[RunConfig], object]:
    # Imported lazily: `dsae-export --help` should not pay for importing Ray and transformers.
    if name == "harvest":
        from distributed_sae.harvest import harvest
        return harvest
    if name == "train":
        from distributed_sae.train import train
        return train
    if name == "eval":
        from distributed_sae.eval import evaluate
        return evaluate
    if name == "steer":
        from distributed_sae.eval.steer import steer_stage
        return steer_stage
    if name == "stream":
        from distributed_sae.train.streaming import stream
        return stream
    if name == "interp":
        from distributed_sae.interp.stage import run_interp
        return run_interp
    from distributed_sae.export import export
    return export


STAGES = {"harvest": ("harvest",), "train": ("train",), "eval": ("eval",),
          "export": ("export",), "run": ("harvest", "train", "eval", "export"),
          "steer": ("steer",), "interp": ("interp",)}

# The stages that read the store at store.path. Export and steer read trained members only (a
# store deleted after training must not stop them), so they are not checked against it.
STORE_STAGES = {"train", "eval", "interp"}

# dsae-steer's short forms: `dsae-steer feature=12 scale=8` means steer.feature=12 steer.scale=8.
STEER_SHORT = ("member", "feature", "scale", "prompt", "max_new_tokens", "temperature")


def run_stages(cfg: RunConfig, stages: tuple[str, ...]) -> None:
    """Run stages in order on a typed config (also the programmatic entry point). With
    stream=true, harvest and train run at once as one stage (train/streaming.py); with
    eval.interp=true the interp stage follows eval."""
    if cfg.eval.interp and "eval" in stages and "interp" not in stages:
        at = stages.index("eval") + 1
        stages = stages[:at] + ("interp",) + stages[at:]
    if cfg.stream and {"harvest", "train"} <= set(stages):
        stages = ("stream",) + tuple(s for s in stages if s not in ("harvest", "train"))
        check_model(cfg)
    elif "harvest" in stages:
        check_model(cfg)  # the harvest makes the store, which then matches the config
    elif set(stages) & STORE_STAGES:
        check_store(cfg)
    for stage in stages:
        log.info("== %s ==", stage)
        _stage_fn(stage)(cfg)
    log.info("done: results in %s", cfg.out_dir)


def _main(dcfg: DictConfig, stages: tuple[str, ...]) -> None:
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        dcfg.out_dir = HydraConfig.get().runtime.output_dir
    try:
        cfg = to_run_config(dcfg)
        logging.getLogger("distributed_sae").setLevel(cfg.log_level)
        run_stages(cfg, stages)
    except Exception as err:
        if not is_user_error(err):
            raise
        # DSAE_TRACEBACK=1: the traceback too (a file missing deep inside a stage).
        log.error("%s", _disk_full(err) or err, exc_info=bool(os.environ.get("DSAE_TRACEBACK")))
        sys.exit(2)


def _app(stages: tuple[str, ...]) -> Callable[[], None]:
    @hydra.main(version_base=None, config_path=CONFIG_PATH, config_name=CONFIG_NAME)
    def main(dcfg: DictConfig) -> None:
        _main(dcfg, stages)

    def entry() -> None:
        register_configs()
        overrides = user_overrides(sys.argv[1:])
        if overrides is not None:
            try:
                check_overrides(overrides, CONFIG_NAME)
            except ConfigError as err:  # before Hydra has set up logging: a plain stderr line
                logging.basicConfig(format="[%(levelname)s] - %(message)s")
                log.error("%s", err)
                sys.exit(2)
        main()

    return entry


harvest_main = _app(STAGES["harvest"])
train_main = _app(STAGES["train"])
eval_main = _app(STAGES["eval"])
export_main = _app(STAGES["export"])
run_main = _app(STAGES["run"])
interp_main = _app(STAGES["interp"])
_steer_app = _app(STAGES["steer"])


def steer_main() -> None:
    """dsae-steer: the steer stage, with its keys also accepted without the `steer.` prefix."""
    sys.argv[1:] = [f"steer.{a}" if a.split("=", 1)[0] in STEER_SHORT else a
                    for a in sys.argv[1:]]
    _steer_app()
