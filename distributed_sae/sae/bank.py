"""A bank: the members one job trains together from one pass over the store, and its grammar.

A member is data: the hook(s) it reads, the hook(s) it reconstructs, its form (sae/forms.py:
sae, transcoder, skip_transcoder, crosscoder, clt), kind, width, the kind's own parameters
(sae/params.py), learning rate and seed. The config describes a bank either as a cross product

    sae.hooks x sae.forms x sae.kinds x sae.widths x (each kind's swept parameters: sae.k,
    sae.l1_coefficient, sae.l0_coefficient) x train.lr

(a transcoder form on a hook of layer L reads blocks.L.ln2.hook_normalized and reconstructs
blocks.L.hook_mlp_out, so sae.forms=[sae,transcoder] over [blocks.15.hook_mlp_out] compares what
the MLP writes with what it computes)
(a list-valued key is swept, a scalar is shared; a parameter only multiplies the kinds that have
it: sae.k=[16,64] gives two topk members per width but one relu member), or as an explicit list
`sae.members=[{kind: topk, width: 2304, k: 16, hook: ...}, ...]` for banks that are not a product
(missing keys come from the sae config's scalars).

Member ids are folder names: `[<form>_]<kind>_w<width>[_k<k>][_<tag><value>...]_s<seed>`, where a tag
appears when that parameter takes more than one value among the bank's members of the kind (so
a plain width sweep keeps `topk_w2304_k32_s0`), prefixed by the hook (`l15_mlp_out.`) when the
bank spans several hooks. The same config always gives the same ids; a collision is refused.
Seeds: sae.seed + the width's index in sae.widths, so members that differ only in k or kind
start from the same weights (the comparison a sweep is for), and a member keeps its seed when
other hooks, kinds or parameters are added to the bank.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

import torch

from distributed_sae.config import ConfigError, SAEConfig, TrainConfig
from distributed_sae.config.checks import MODEL_B_PREFIX, bare_hook, is_model_b, parse_hook
from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.sae.forms import FORMS, Form
from distributed_sae.sae.params import SWEEPABLE, KindParams, config_values
from distributed_sae.sae.registry import k_kinds, sae_class


# Folder-name tag of the second model's hooks: 'b/blocks.15.hook_resid_post' -> 'b_l15_resid_post'.
B_TAG = "b_"


def hook_tag(hook: str) -> str:
    """'blocks.15.hook_resid_post' -> 'l15_resid_post', 'blocks.15.mlp.hook_post' -> 'l15_mlp_post',
    the second model's 'b/blocks.15.hook_resid_post' -> 'b_l15_resid_post'."""
    prefix = B_TAG if is_model_b(hook) else ""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", bare_hook(hook))
    if m is None:
        return re.sub(r"[^A-Za-z0-9_]+", "_", hook)
    rest = m.group(2).replace("hook_", "").replace(".", "_")
    return f"{prefix}l{m.group(1)}_{rest}"


# What each form reads and writes, for the message refusing a member that does not fit.
FORM_SHAPES = {"sae": "an sae reads one hook and reconstructs it (give `hook`)",
               "crosscoder": "a crosscoder reads two or more hooks and reconstructs them (give "
                             "`inputs`)",
               "transcoder": "a transcoder reads one hook and writes one other (give `layer`, or "
                             "`inputs` and `targets` of one hook each)",
               "skip_transcoder": "a skip_transcoder reads one hook and writes one other (give "
                                  "`layer`, or `inputs` and `targets` of one hook each)",
               "clt": "a clt reads one MLP input per layer and writes one MLP output per layer "
                      "(give `layers`, two or more)"}


def hooks_tag(hooks: Sequence[str]) -> str:
    """hook_tag of one hook; of consecutive layers' same hook of one model
    'l12-15_ln2_normalized' ('b_l12-15_...'); else the tags joined by '+'."""
    tags = [hook_tag(h) for h in hooks]
    parsed = [re.match(r"^((?:" + B_TAG + r")?)l(\d+)_(.+)$", t) for t in tags]
    if len(tags) > 1 and all(parsed) and len({m.group(1, 3) for m in parsed}) == 1:  # type: ignore
        layers = [int(m.group(2)) for m in parsed]  # type: ignore[union-attr]
        if layers == list(range(layers[0], layers[0] + len(layers))):
            prefix, rest = parsed[0].group(1, 3)  # type: ignore[union-attr]
            return f"{prefix}l{layers[0]}-{layers[-1]}_{rest}"
    return "+".join(tags)


@dataclass(frozen=True)
class MemberSpec:
    """One member of a bank: what to build, what it reads and reconstructs, how to name it."""

    kind: str
    width: int
    params: KindParams  # the kind's own parameters (k, l1_coefficient, ...)
    inputs: tuple[str, ...]  # hook(s) the encoder reads, concatenated in this order
    # Hook(s) the decoder reconstructs, concatenated; () = the inputs (an SAE, a crosscoder).
    targets: tuple[str, ...] = ()
    seed: int = 0
    # Adam's peak learning rate; None = train.lr, or the kind's default_lr when that is unset.
    lr: Optional[float] = None
    name: str = ""  # folder name within the bank; "" = base_name()
    # sae/forms.py: sae, transcoder, skip_transcoder, crosscoder, clt; "" = sae for one hook,
    # crosscoder for several, transcoder when the targets differ from the inputs.
    form: str = ""

    def __post_init__(self) -> None:
        if not self.form:
            same = self.targets in ((), self.inputs)
            derived = ("sae" if len(self.inputs) == 1 else "crosscoder") if same else "transcoder"
            object.__setattr__(self, "form", derived)
        if self.form in ("sae", "crosscoder") and self.targets == self.inputs:
            object.__setattr__(self, "targets", ())
        n_in, n_out = len(self.inputs), len(self.targets)
        shape_ok = {"sae": n_in == 1 and n_out == 0, "crosscoder": n_in >= 2 and n_out == 0,
                    "transcoder": (n_in, n_out) == (1, 1),
                    "skip_transcoder": (n_in, n_out) == (1, 1),
                    "clt": n_in == n_out >= 2}.get(self.form)
        if shape_ok is None:
            raise ValueError(f"form={self.form!r} is not one of {', '.join(FORMS)}")
        if not shape_ok:
            raise ValueError(f"a {self.form} cannot read {list(self.inputs)} and write "
                             f"{list(self.targets) or list(self.inputs)}: {FORM_SHAPES[self.form]}")

    @property
    def hook(self) -> str:
        """The one hook an SAE reads and reconstructs."""
        if len(self.inputs) != 1 or self.targets:
            raise ValueError(f"{self.member_id} reads {self.inputs} and writes {self.targets}: "
                             f"not a single-hook member")
        return self.inputs[0]

    @property
    def outputs(self) -> tuple[str, ...]:
        """The hooks the member reconstructs (its inputs for an SAE or crosscoder)."""
        return self.targets or self.inputs

    def build_form(self, dims: Mapping[str, int]) -> Form:
        """The member's Form from the widths of its hooks."""
        out = tuple(dims[h] for h in self.targets)
        return Form(self.form, tuple(dims[h] for h in self.inputs), out)

    @property
    def hooks(self) -> tuple[str, ...]:
        """Every hook the member needs, inputs first, each once."""
        return tuple(dict.fromkeys(self.inputs + self.targets))

    @property
    def k(self) -> int | None:
        return getattr(self.params, "k", None)

    def base_name(self, tags: Sequence[str] = ()) -> str:
        """`<kind>_w<width>[_k<k>]<tags>_s<seed>`."""
        k = f"_k{self.k}" if self.kind in k_kinds() else ""
        form = "" if self.form == "sae" else f"{self.form}_"
        return f"{form}{self.kind}_w{self.width}{k}{''.join(tags)}_s{self.seed}"

    @property
    def member_id(self) -> str:
        """Folder name of the member, unique within a bank: e.g. 'topk_w2304_k32_s0'."""
        return self.name or self.base_name()


def sae_member(hook: str, kind: str, width: int, seed: int = 0, lr: float | None = None,
               **params: Any) -> MemberSpec:
    """A single-hook SAE member with the kind's parameters from keywords (defaults otherwise)."""
    cls = sae_class(kind)
    return MemberSpec(kind, width, cls.Params.build({}, params), (hook,), seed=seed, lr=lr)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _lrs(train: TrainConfig) -> list[float | None]:
    return _as_list(train.lr)


def mlp_io(layer: int, prefix: str = "") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A transcoder of layer L's MLP: (its input after the norm,), (its output,); prefix
    MODEL_B_PREFIX: of the second model's layer L."""
    block = f"{prefix}blocks.{layer}"
    return (f"{block}.ln2.hook_normalized",), (f"{block}.hook_mlp_out",)


def _layer_io(hook: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """mlp_io of `hook`'s layer, in `hook`'s model (a 'b/' hook: the second model's MLP)."""
    return mlp_io(parse_hook(hook)[0], MODEL_B_PREFIX if is_model_b(hook) else "")


def _form_hooks(form: str, hook: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, targets) of a product member of `form` on `hook`."""
    if form == "sae":
        return (hook,), ()
    return _layer_io(hook)  # a transcoder of the hook's layer's MLP


def _product(sae: SAEConfig, hooks: Sequence[str], train: TrainConfig) -> list[MemberSpec]:
    values = config_values(sae=sae, train=train)
    specs, seen = [], set()
    for hook, form in itertools.product(hooks, sae.forms):
        io = _form_hooks(form, hook)
        if (form, io) in seen:  # two hooks of one layer give that layer's transcoder once
            continue
        seen.add((form, io))
        for kind in sae.kind_list:
            cls = sae_class(kind)
            swept = [(name, _as_list(getattr(sae, name))) for name in SWEEPABLE
                     if cls.Params.has(name)]
            for i, width in enumerate(sae.widths):
                for combo in itertools.product(*(v for _, v in swept)):
                    over = dict(zip((n for n, _ in swept), combo))
                    params = cls.Params.build(values, over)
                    for lr in _lrs(train):
                        specs.append(MemberSpec(kind, width, params, io[0], io[1],
                                                seed=sae.seed + i, lr=lr, form=form))
    return specs


MEMBER_KEYS = ("kind", "width", "hook", "inputs", "targets", "seed", "lr", "name", "form",
               "layer", "layers")


def _entry_hooks(entry: Mapping[str, Any], form: str, hooks: Sequence[str],
                 where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, targets) of an entry of sae.members: `inputs`/`targets`, or `hook` (an SAE's
    hook, or a hook of the layer whose MLP a transcoder replaces), `layer` (a transcoder) or
    `layers` (a clt: the MLP inputs and outputs of each layer)."""
    if form and form not in FORMS:
        raise ConfigError(f"{where} has form={form!r}: forms are {', '.join(FORMS)}")
    if "layers" in entry:
        if form != "clt":
            raise ConfigError(f"{where} gives layers={entry['layers']}, which only a clt takes: "
                              f"set form: clt or give inputs")
        layers = [int(v) for v in _as_list(entry["layers"])]
        if layers != list(range(layers[0], layers[0] + len(layers))) or len(layers) < 2:
            raise ConfigError(f"{where}: layers={layers} must be at least two consecutive layers")
        ios = [mlp_io(layer) for layer in layers]
        return tuple(i[0][0] for i in ios), tuple(i[1][0] for i in ios)
    if form in ("transcoder", "skip_transcoder") and "inputs" not in entry:
        if "layer" in entry:
            return mlp_io(int(entry["layer"]))
        return _layer_io(str(entry.get("hook", hooks[0])))
    inputs = tuple(_as_list(entry.get("inputs", entry.get("hook", hooks[0]))))
    targets = tuple(_as_list(entry.get("targets", ())))
    for hook in inputs + targets:
        parse_hook(hook)
    return inputs, targets


def _explicit(sae: SAEConfig, train: TrainConfig, hooks: Sequence[str],
              entry: Mapping[str, Any], index: int) -> MemberSpec:
    """One entry of sae.members: {kind, width, hook | inputs, [seed, lr, name, params...]}."""
    where = f"sae.members[{index}]"
    entry = dict(entry)
    if "width" not in entry:
        raise ConfigError(f"{where}={entry} has no width: give e.g. width: 2304")
    kind = entry.get("kind", sae.kind)
    cls = sae_class(kind)
    form = str(entry.get("form", ""))
    inputs, targets = _entry_hooks(entry, form, hooks, where)
    if form == "clt" and not cls.per_latent_codes:
        raise ConfigError(f"{where}: a clt of kind {kind} would pick each token's codes across "
                          f"layers, so layer l's features would read later layers (acausal): "
                          f"use kind batchtopk, jumprelu, relu, gated or matryoshka")
    own = {k: v for k, v in entry.items() if k not in MEMBER_KEYS}
    values = config_values(sae=sae, train=train)
    for name in SWEEPABLE:
        if cls.Params.has(name) and name not in own and isinstance(getattr(sae, name), list):
            raise ConfigError(f"{where} has no {name} and sae.{name}={getattr(sae, name)} is a "
                              f"sweep: give the member its own {name}")
    try:
        params = cls.Params.build(values, own)
    except TypeError as err:
        raise ConfigError(f"{where}={entry}: {err}") from None
    lr = entry.get("lr", None if isinstance(train.lr, list) else train.lr)
    try:
        return MemberSpec(kind, int(entry["width"]), params, inputs, targets,
                          seed=int(entry.get("seed", sae.seed + index)), lr=lr,
                          name=str(entry.get("name", "")), form=form)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _named(specs: list[MemberSpec]) -> list[MemberSpec]:
    """Give every member without an explicit name its id (see the module docstring)."""
    tagged: dict[str, list[str]] = {}  # kind -> the swept parameters that name its members
    for kind in dict.fromkeys(s.kind for s in specs):
        same = [s for s in specs if s.kind == kind]
        tagged[kind] = [n for n in SWEEPABLE if n != "k" and same[0].params.has(n)
                        and len({getattr(s.params, n) for s in same}) > 1]
    lr_tag = len({s.lr for s in specs}) > 1
    multi_hook = len({s.inputs for s in specs}) > 1
    out = []
    for s in specs:
        if s.name:
            out.append(s)
            continue
        tags = [f"_{SWEEPABLE[n]}{getattr(s.params, n):g}" for n in tagged[s.kind]]
        if lr_tag:
            tags.append(f"_lr{s.lr:g}" if s.lr is not None else "_lrdefault")
        name = s.base_name(tags)
        if multi_hook:
            name = hooks_tag(s.inputs) + "." + name
        out.append(replace(s, name=name))
    return out


def expand_bank(sae: SAEConfig, hooks: str | Sequence[str],
                train: TrainConfig | None = None) -> list[MemberSpec]:
    """The bank's members, in order: hook, kind, width, swept parameters, lr (or the order of
    sae.members). `hooks`: the hooks the bank reads (RunConfig.sae_hooks)."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    train = train if train is not None else TrainConfig()
    if sae.members:
        specs = [_explicit(sae, train, hooks, e, i) for i, e in enumerate(sae.members)]
    else:
        specs = _product(sae, hooks, train)
    specs = _named(specs)
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.member_id in seen:
            raise ConfigError(f"members {seen[s.member_id]} and {i} of the bank are both named "
                              f"{s.member_id!r}: give them different seeds or names")
        seen[s.member_id] = i
    return specs


def member_lr(spec: MemberSpec, train: TrainConfig) -> float:
    """The member's peak learning rate: its spec's, else train.lr, else its kind's default."""
    if spec.lr is not None:
        return spec.lr
    if train.lr is not None and not isinstance(train.lr, list):
        return float(train.lr)
    return sae_class(spec.kind).default_lr


def build_sae(spec: MemberSpec, dims: int | Mapping[str, int]) -> SparseAutoencoder:
    """Instantiate the member (fp32 master weights) from its spec's parameters; `dims`: the
    width of each hook it reads or writes (one int: every hook's)."""
    form = spec.build_form(dims if isinstance(dims, Mapping) else {h: dims for h in spec.hooks})
    return sae_class(spec.kind).from_params(form.d_in, spec.width, spec.params, seed=spec.seed,
                                            dtype=torch.float32, form=form)
