"""Names and checks the config schemas share: hook-point parsing, the allowed values of the
choice fields, and the validation helpers that raise ConfigError with the value and the key."""

from __future__ import annotations

import re

from distributed_sae.config.errors import ConfigError

# The hook-point names are one scheme across architectures (see distributed_sae.models.hooks).
# `ln2.hook_normalized` is TransformerLens's name for the MLP's input (after the pre-MLP norm),
# what a transcoder reads; like `mlp.hook_post` it contains a dot, so it is escaped below.
HOOK_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "mlp.hook_post",
              "ln2.hook_normalized")
# Hooks of the second model (RunConfig.model_b, for model diffing: the same tokens through two
# models) carry this prefix, 'b/blocks.15.hook_resid_post'. A '/' cannot occur in a hook of the
# first model, so the two never collide; in the store the hook is the array acts/b/blocks.15...
MODEL_B_PREFIX = "b/"
_HOOK_RE = re.compile(r"^(?:" + re.escape(MODEL_B_PREFIX) + r")?blocks\.(\d+)\.("
                      + "|".join(re.escape(k) for k in HOOK_KINDS) + r")$")

DTYPES = ("float32", "float16", "bfloat16")
RELU_RECIPES = ("towards_monosemanticity", "april_2024")
DATA_PARALLEL = ("ddp", "zero2")
PLACEMENTS = ("cost", "replicate")
# train.optimizer's choices (train/optim.py; auto picks one per member)
OPTIMIZERS = ("auto", "adam", "signum_sf")
# train.topk_screen's choices (kernels/select.py's bf16 screen of the TopK encoder)
SCREENS = ("auto", "bf16", "off")
COMPRESSIONS = ("none", "zstd", "blosc")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# How one harvest actor holds a model: whole on one device, spread by HF device_map inside the
# actor, or partitioned by DeepSpeed ZeRO-3 over a group of actors (one process group).
SHARDINGS = ("none", "device_map", "deepspeed")
# The package logger's level (RunConfig.log_level): the names logging.Logger.setLevel takes.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_hook(name: str) -> tuple[int, str]:
    """'blocks.15.hook_resid_post' -> (15, 'hook_resid_post'), and the same for the second
    model's 'b/blocks.15.hook_resid_post' (is_model_b tells them apart); ConfigError for
    anything else."""
    m = _HOOK_RE.match(name)
    if m is None:
        raise ConfigError(
            f"unknown hook point {name!r}: expected 'blocks.<layer>.<kind>' with kind one of "
            f"{', '.join(HOOK_KINDS)} (e.g. 'blocks.15.hook_resid_post'), or the same prefixed "
            f"by {MODEL_B_PREFIX!r} for the second model, model_b"
        )
    return int(m.group(1)), m.group(2)


def is_model_b(hook: str) -> bool:
    """Whether `hook` is a hook of the second model (RunConfig.model_b): 'b/blocks.<L>.<kind>'."""
    return hook.startswith(MODEL_B_PREFIX)


def bare_hook(hook: str) -> str:
    """The hook's name within its own model: 'b/blocks.15.hook_resid_post' -> 'blocks.15...'."""
    return hook[len(MODEL_B_PREFIX):] if is_model_b(hook) else hook


def _name(owner: str, key: str) -> str:
    """The dotted config key; owner "" for the run's top-level keys (log_level, out_dir)."""
    return f"{owner}.{key}" if owner else key


def positive(owner: str, **values: float) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{_name(owner, key)} must be positive, got {value!r}")


def non_negative(owner: str, **values: float) -> None:
    for key, value in values.items():
        if value is None or value < 0:
            raise ConfigError(f"{_name(owner, key)} must be >= 0, got {value!r}")


def choice(owner: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{_name(owner, key)}={value!r} is not one of {', '.join(choices)}")


def device(owner: str, key: str, value: str) -> None:
    """A torch device string ('cpu', 'cuda', 'cuda:1', 'mps'), parsed by torch.device, which
    looks at no hardware: whether the GPU exists is the start-up checks' business."""
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{_name(owner, key)}={value!r} is not a torch device: use e.g. cpu, "
                          f"cuda or cuda:1") from None


def sweep(owner: str, key: str, value: object, kind: type) -> object:
    """A scalar or a list of values to sweep (each positive, no repeats), cast to `kind`; a
    one-element list is returned as its scalar."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        values = [kind(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}.{key}={value!r} must be a number or a list of numbers") from None
    if not isinstance(value, (list, tuple)):
        positive(owner, **{key: values[0]})
    elif not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"{owner}.{key}={list(value)} must be a non-empty list of positive "
                          f"values without repeats")
    return values[0] if len(values) == 1 else values
