"""Each kind's own parameters, as a typed dataclass that validates itself.

A kind declares `Params` (a subclass of KindParams) beside its class; the fields are exactly the
keywords of its constructor after (d_in, d_sae), so `cls(d_in, d_sae, **params.kwargs())` builds
it and `cls.Params(**sae.extra_state())` gives them back. Each field names, in its metadata, the
run-config key it is read from (`sae.k`, `train.auxk_coefficient`, ...): the config layer fills a
member's parameters from there, with the member's own values (a sweep's k, l1) winning.

What is derived from the fields rather than kept by hand: whether a kind is set by k (it has a
`k` field), which parameters a bank may sweep (`SWEEPABLE` below) and the member-name tags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from distributed_sae.config.errors import ConfigError

# Parameters a bank may sweep as lists (sae.k=[16,64], sae.l1_coefficient=[...]), and the tag each
# adds to a member's name when it is swept (k is always in the name of a k-kind).
SWEEPABLE = {"k": "k", "l1_coefficient": "l1c", "l0_coefficient": "l0c"}


def from_key(key: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field read from run-config key `key` ('sae.k', 'train.auxk_coefficient')."""
    if default is dataclasses.MISSING and "default_factory" not in kwargs:
        return field(metadata={"config": key}, **kwargs)
    return field(default=default, metadata={"config": key}, **kwargs)


@dataclass(frozen=True)
class KindParams:
    """Base of the kinds' parameter dataclasses (no fields of its own)."""

    kind = "base"  # class attribute of each subclass: the kind's registry name

    def kwargs(self) -> dict[str, Any]:
        """The constructor keywords (lists for sequences, as JSON and the kinds take them)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def config_keys(cls) -> dict[str, str]:
        """field name -> the run-config key it is read from."""
        return {f.name: f.metadata["config"] for f in dataclasses.fields(cls)
                if "config" in f.metadata}

    @classmethod
    def build(cls, values: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
              ) -> KindParams:
        """Parameters from `values` (config key -> value, e.g. {'sae.k': 32}), `overrides`
        (field name -> value) winning; keys of `overrides` the kind lacks are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides or {}) - names)
        if unknown:
            raise ConfigError(f"{cls.kind}: parameter(s) {unknown} do not apply to this kind; "
                              f"its parameters are {sorted(names)}")
        kw = {name: values[key] for name, key in cls.config_keys().items() if key in values}
        kw.update(overrides or {})
        for name, value in kw.items():
            if isinstance(value, list):
                kw[name] = tuple(value)  # frozen and hashable
        return cls(**kw)

    @classmethod
    def has(cls, name: str) -> bool:
        return any(f.name == name for f in dataclasses.fields(cls))

    def _require(self, ok: bool, name: str, rule: str) -> None:
        """ConfigError naming the kind, the field, its value and the rule when not ok."""
        if not ok:
            key = self.config_keys().get(name, name)
            raise ConfigError(f"{self.kind}: {name}={getattr(self, name)!r} {rule} (set it with "
                              f"{key}=...)")


def positive(params: KindParams, *names: str) -> None:
    for name in names:
        params._require(getattr(params, name) > 0, name, "must be positive")


def non_negative(params: KindParams, *names: str) -> None:
    for name in names:
        params._require(getattr(params, name) >= 0, name, "must be >= 0")


def config_values(**sections: Any) -> dict[str, Any]:
    """{'sae.k': 32, 'train.auxk_coefficient': 0.03125, ...} from config dataclasses given by
    section name (sae=SAEConfig, train=TrainConfig). Swept keys (lists of values for a
    SWEEPABLE parameter) are left out: each member passes its own value as an override."""
    out = {}
    for section, cfg in sections.items():
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in SWEEPABLE and isinstance(value, (list, tuple)):
                continue
            out[f"{section}.{f.name}"] = value
    return out
