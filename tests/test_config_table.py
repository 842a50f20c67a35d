"""Every leaf field of the run config, with a bad value: each is refused at composition with a
one-line ConfigError that names the field and the value (or says why the field has none).

A new field fails test_every_field_has_an_entry until it gets an entry in BAD or NO_BAD_VALUE.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from test_config import compose_run

from distributed_sae.config import ConfigError, RunConfig


def walk(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, object]]:
    """(dotted key, type) of every leaf field of the config dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from walk(t, prefix + f.name + ".")
        else:
            yield prefix + f.name, t


KEYS = [key for key, _ in walk(RunConfig)]

# The second model's keys matter once it is set: every model_b entry sets it.
MODEL_B = ["model_b.name=smollm2-135m"]

# key -> a bad override value, or (value, extra overrides that reach the check, the fragment the
# message must hold instead of the value when the message does not print it as written).
BAD: dict[str, str | tuple[str, list[str], str | None]] = {
    "model.name": ("''", [], "model.name is empty"),
    "model.dtype": "float8",
    "model.device": "gpu",
    "model.device_map": "everywhere",
    "model_b.dtype": ("float8", MODEL_B, None),
    "model_b.device": ("cuda:x", MODEL_B, None),
    "model_b.device_map": ("everywhere", MODEL_B, None),
    "data.name": ("''", [], "data.name is empty"),
    "data.context_size": "1",
    "data.n_tokens": "-5",
    "data.seed": "-1",
    "harvest.hooks": "[blocks.15.hook_resid_post,blocks.15.hook_resid_post]",
    "harvest.num_actors": "0",
    "harvest.cpus_per_actor": "-0.5",
    "harvest.gpus_per_actor": "-0.5",  # None = from model.device; 0 = a CPU actor
    "harvest.batch_size": "0",
    "harvest.contexts_per_unit": "0",
    "harvest.sharding": "zero3",
    "harvest.group_size": ("0", ["harvest.sharding=deepspeed"], None),
    "store.path": ("''", [], "store.path is empty"),
    "store.dtype": "int8",
    "store.chunk_tokens": "1000",  # does not divide a unit's 32 x 128 rows
    "store.compression": "gzip",
    "store.max_bytes": "-1",  # 0 = unbounded
    "sae.kind": "sparse",
    "sae.kinds": "[]",
    "sae.widths": ("[2304,-5]", [], "sae.widths has -5"),
    "sae.k": "0",
    "sae.hook": "blocks.2.hook_resid_post",  # not harvested
    "sae.hooks": "[blocks.2.hook_resid_post]",
    "sae.l1_coefficient": ("-0.1", ["sae=relu"], None),
    "sae.recipe": "may_2024",
    "sae.l0_coefficient": ("-0.1", ["sae.kind=jumprelu"], None),
    "sae.jumprelu_threshold": "-1.0",
    "sae.jumprelu_bandwidth": "0.0",
    "sae.matryoshka_fractions": "[0.5,0.25,1.0]",
    "sae.forms": "[]",
    "sae.members": ("[{kind:sparse,width:16}]", [], "sae.members[0].kind='sparse'"),
    "train.tokens": "-1",  # 0 = one pass
    "train.batch_size": "0",
    "train.optimizer": "sgd",
    "train.topk_screen": "fp8",
    "train.signum_momentum": "1.5",
    "train.lr": "-0.001",  # None = the optimiser's and kind's default
    "train.warmup_steps": "-1",  # 0 = no warm-up
    "train.auxk_coefficient": "-0.1",  # checked by the topk member's parameters
    "train.dead_tokens": "0",
    "sae.encoder_init_norm": "-1.0",
    "train.dead_report_tokens": "0",
    "train.outlier_norm_ratio": "0.8",  # 0 = keep all rows
    "train.skip_init": "random",
    "train.device": "gpu",
    "train.cpus": "0",  # None = auto
    "train.holdout_fraction": "1.5",
    "train.seed": "-1",
    "train.log_every": "0",
    "train.workers": "0",
    "train.data_parallel": "zero3",
    "train.placement": "spread",
    "train.latent_shards": "0",
    "train.checkpoint_every": "-1",  # 0 = never
    "train.keep_checkpoints": "0",
    "train.max_failures": "-1",
    "train.resample_steps": ("[100,-5]", ["sae=relu"], None),  # [] = never
    "train.resample_window": "0",
    "train.resample_inputs": "0",
    "eval.tokens": "-1",  # 0 = all held-out tokens
    "eval.batch_size": "0",
    "eval.spliced_tokens": "0",
    "eval.spliced_batch_size": "0",
    "eval.n_top_contexts": "0",
    "eval.context_window": "-1",
    "eval.split_threshold": "1.5",
    "export.path": ("''", [], "export.path is empty"),
    "export.dtype": "float8",
    "export.hub_repo_id": "my-sae",  # not org/name
    "cluster.num_cpus": "0",  # None = every CPU
    "cluster.placement": "scatter",
    "steer.feature": "-1",
    "steer.max_new_tokens": "0",
    "steer.temperature": "-0.5",  # 0 = greedy
    "interp.features": "-1",
    "interp.neurons": "-1",  # 0 = no baseline
    "interp.backend": "anthropic",
    "interp.base_url": ("ftp://127.0.0.1:8000/v1", ["interp.backend=openai"], None),
    "interp.concurrency": "0",
    "interp.max_retries": "-1",
    "interp.requests_per_minute": "-1",  # 0 = no limit
    "interp.timeout_s": "-1.5",
    "interp.cost_per_1k_prompt": "-0.5",  # 0 = free
    "interp.cost_per_1k_completion": "-0.5",
    "interp.device": "gpu",
    "interp.scorers": "[detection,vibes]",
    "interp.tokens": "-1",  # 0 = all
    "interp.window": "0",
    "interp.explain_top": "0",
    "interp.explain_quantile": "-1",
    "interp.score_active": "0",
    "interp.score_inactive": "0",
    "interp.seed": "-1",
    "interp.rate_units": "-1",  # 0 = no page
    "out_dir": ("''", [], "out_dir is empty"),
    "log_level": "LOUD",
}

# key -> why no value of the right type is wrong at config time.
NO_BAD_VALUE: dict[str, str] = {
    "model.revision": "any branch, tag or commit of the hub repo; only the hub knows which exist",
    "model.gguf_file": "a file inside model.name, only known when the model is loaded",
    "model.cache_dir": "any folder, '' for none; one that cannot be written is skipped with a "
                       "warning (tests/test_gguf_cache.py)",
    "model.trust_remote_code": "a boolean",
    "model_b.name": "'' = no second model; a name is checked at start-up by cli.check_model "
                    "(model registry), not in the config",
    "model_b.revision": "as model.revision",
    "model_b.gguf_file": "as model.gguf_file",
    "model_b.cache_dir": "as model.cache_dir",
    "model_b.trust_remote_code": "a boolean",
    "data.subset": "free text: a config name of the hub dataset, only known when it loads",
    "data.split": "a split of the hub dataset (train, train[:10%]), only known when it loads; "
                  "local corpora ignore it",
    "data.text_field": "a column of the dataset's rows, only known when it loads; cpython and "
                       ".txt files ignore it",
    "data.prepend_bos": "a boolean",
    "data.exclude_special_tokens": "a boolean",
    "data.streaming": "a boolean",
    "data.cache_dir": "any folder, '' for none; one that cannot be written is skipped with a "
                      "warning (tests/test_corpora.py)",
    "store.overwrite": "a boolean",
    "sae.seed": "any int: torch's generators take negative seeds too (they wrap)",
    "train.resume": "a boolean",
    "train.signum_unit_decoder": "a boolean",
    "train.wandb_project": "free text (a W&B project name; None = no W&B)",
    "train.wandb_entity": "free text (a W&B team or user)",
    "train.wandb_run_name": "free text",
    "eval.spliced": "a boolean",
    "eval.features": "a boolean",
    "eval.dashboard": "a boolean",
    "eval.interp": "a boolean",
    "export.hub_revision": "any branch name (created if missing)",
    "export.hub_private": "a boolean",
    "cluster.address": "any address ray.init takes ('auto', 'host:port', 'ray://host:port'), "
                       "checked when Ray connects",
    "steer.member": "a member folder or SAE path, checked when dsae-steer loads it",
    "steer.scale": "any float: a negative scale steers away from the feature, 0 is the clean text",
    "steer.prompt": "free text",
    "interp.members": "member folder names, known only after training ([] = every member)",
    "interp.model": "a model name, loaded (and checked) only by the interp stage",
    "interp.api_key_env": "any environment variable name; an unset one means no key (a local "
                          "server needs none)",
    "interp.cache_dir": "any directory",
    "interp.ratings": "a file saved from rate.html ('' = none), read by the interp stage",
    "stream": "a boolean",
}


def _entry(key: str) -> tuple[str, list[str], str | None]:
    entry = BAD[key]
    return (entry, [], None) if isinstance(entry, str) else entry


def _renderings(key: str, value: str) -> set[str]:
    """How a message may print the override value: as written, or as Python prints the parsed
    value (lists: "['a', 'b']"; an int given to a float field: "-1.0")."""
    parsed = OverridesParser.create().parse_override(f"{key}={value}").value()
    out = {value, repr(parsed), str(parsed)}
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        out |= {repr(float(parsed)), repr(int(parsed)) if float(parsed).is_integer() else value}
    return out


def _mentions(message: str, text: str) -> bool:
    """`text` occurs in `message` as a whole token: 'sae.k' not inside 'sae.kind', '0' not
    inside '1.0' or '2304'."""
    return re.search(rf"(?<![\w.]){re.escape(text)}(?!\w|\.\d)", message) is not None


def test_every_field_has_an_entry():
    assert len(KEYS) == len(set(KEYS))
    missing = sorted(set(KEYS) - set(BAD) - set(NO_BAD_VALUE))
    assert not missing, f"config fields with no entry in BAD or NO_BAD_VALUE: {missing}"
    unknown = sorted((set(BAD) | set(NO_BAD_VALUE)) - set(KEYS))
    assert not unknown, f"entries for keys that are not config fields: {unknown}"
    both = sorted(set(BAD) & set(NO_BAD_VALUE))
    assert not both, f"keys in both BAD and NO_BAD_VALUE: {both}"
    assert all(NO_BAD_VALUE.values())


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_value_is_refused_naming_key_and_value(key):
    value, extra, fragment = _entry(key)
    if extra:  # the extra overrides alone compose: the refusal is the value's
        compose_run(extra)
    with pytest.raises(ConfigError) as err:
        compose_run([*extra, f"{key}={value}"])
    message = str(err.value)
    assert "\n" not in message, message
    assert _mentions(message, key), message
    if fragment is not None:
        assert fragment in message, message
    else:
        assert any(_mentions(message, r) for r in _renderings(key, value)), message
