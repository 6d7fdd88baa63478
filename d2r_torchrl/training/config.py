"""Run configuration: dataclass sections (OmegaConf structured configs), reference presets,
dotted overrides and the project's rules on values.

Override any field from the command line as ``section.field=value``
(``loss.gamma=0.98``, ``env.benchmark=MT50``, ``loss.max_log_alpha=none``); OmegaConf checks
keys and types, :func:`validate` the choices, ranges and rules between fields. Every number
read as a float must be finite (``nan`` and ``inf`` are refused everywhere).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from d2r_torchrl.envs.metaworld import EXECUTION_MODES, GOAL_MODES, REWARD_VERSIONS, resolve_tasks
from d2r_torchrl.modules.distributions import LOG_PROB_FORMS
from d2r_torchrl.objectives.multitask_sac import EXTREME_LOSS_RULES

ALGORITHMS = ("d2r", "soft_modular", "mt_sac", "mh_sac")
COLLECTORS = ("sync", "multi_sync", "multi_async", "ray")
BUFFERS = ("stratified_prioritized", "stratified", "prioritized", "uniform")
WARMUP_POLICIES = ("policy", "random")
LOGGERS = ("csv", "tensorboard", "wandb")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Keys a resumed run may change: where and how fast it runs, what it prints, and how long it
# trains (a larger budget continues a finished run), not what it computes.
RESUME_OVERRIDES = (
    "collector.total_steps_per_task",
    "device",
    "log.progress_bar",
    "compile.enabled",
    "compile.mode",
    "compile.backend",
    "compile.cudagraphs",
    "compile.native_chain",
)
# Keys of earlier versions, ignored in the config.json of older runs.
REMOVED_KEYS = ("compile.chain_kernels",)


class ConfigError(ValueError):
    """A configuration key or value is not accepted."""


# Rules on single values, kept in each field's metadata and checked by validate().
POSITIVE = (lambda value: value > 0, "must be positive")
NON_NEGATIVE = (lambda value: value >= 0, "must be >= 0")
UNIT_INTERVAL = (lambda value: 0 <= value <= 1, "must be in [0, 1]")
RATE = (lambda value: 0 < value <= 1, "must be in (0, 1]")
ONE_OR_MORE = (lambda value: value is None or value >= 1, "must be >= 1 or none")
POSITIVE_OR_NONE = (lambda value: value is None or value > 0, "must be positive or none")
# NumPy takes seeds in [0, 2**32); the envs add the task index and, on resuming with random
# goals, the rounds done to the run's seed.
MAX_SEED = 2**31 - 1
SEED = (lambda value: 0 <= value <= MAX_SEED, f"must be in [0, {MAX_SEED}]")


def ruled(default: Any, rule: tuple, **metadata: Any) -> Any:
    """A dataclass field with ``default`` whose value must satisfy ``rule``."""
    return field(default=default, metadata={"rule": rule, **metadata})


def choice(default: Any, accepted: Sequence[Any]) -> Any:
    """A dataclass field with ``default`` whose value must be one of ``accepted``."""
    rule = (lambda value: value in accepted, f"is not accepted; accepted: {list(accepted)}")
    return ruled(default, rule, accepted=tuple(accepted))


@dataclass
class EnvConfig:
    benchmark: str = "MT10"
    goals: str = choice("random", GOAL_MODES)
    max_episode_steps: int = ruled(200, POSITIVE)
    reward_scale: float = ruled(0.1, POSITIVE)
    reward_function_version: str = choice("v2", REWARD_VERSIONS)
    execution: str = choice("serial", EXECUTION_MODES)


@dataclass
class NetworkConfig:
    architecture: str = choice("d2r", ALGORITHMS)
    num_modules: int = ruled(16, POSITIVE)
    module_width: int = ruled(128, POSITIVE)
    top_k: int = ruled(2, POSITIVE)
    soft_modular_preset: str = choice("shallow", ("shallow", "deep"))
    # the policy's log-probability: TorchRL's exact TanhNormal or the reference's bounded form
    log_prob: str = choice("exact", LOG_PROB_FORMS)
    # a LayerNorm after every hidden Linear of the critics (D2R: encoder and modules)
    critic_layer_norm: bool = False
    # none: the critic regresses Q; K: a categorical critic (HL-Gauss, K bins over +- the soft
    # return bound of loss.clip_td_target's rule) trained by cross-entropy
    critic_value_bins: typing.Optional[int] = ruled(None, (lambda value: value is None or value >= 2, "must be >= 2 or none"))


@dataclass
class LossConfig:
    gamma: float = ruled(0.99, RATE)
    loss_balancing: bool = True
    alpha_init: float = ruled(1.0, POSITIVE)
    max_log_alpha: typing.Optional[float] = 0.0
    extreme_loss_threshold: typing.Optional[float] = ruled(3000.0, POSITIVE_OR_NONE)
    extreme_loss_rule: str = choice("clip", EXTREME_LOSS_RULES)
    time_limit_terminal: bool = False
    target_update_tau: float = ruled(0.005, RATE)
    actor_lr: float = ruled(3e-4, POSITIVE)
    critic_lr: float = ruled(3e-4, POSITIVE)
    alpha_lr: float = ruled(1e-4, POSITIVE)
    grad_clip_norm: typing.Optional[float] = ruled(1.0, POSITIVE_OR_NONE)
    # critic options (off: the reference's loss). clip_td_target: clamp TD targets to the soft
    # return bound of the rewards, the capped temperature and gamma (objectives/value_targets.py);
    # reward_normalization: divide each task's rewards by the largest |reward| it has shown
    clip_td_target: bool = False
    reward_normalization: bool = False


@dataclass
class CollectorConfig:
    kind: str = choice("sync", COLLECTORS)
    num_workers: int = ruled(2, POSITIVE)
    steps_per_task: int = ruled(200, POSITIVE)
    updates_per_round: int = ruled(200, NON_NEGATIVE)
    warmup_rounds: int = ruled(20, NON_NEGATIVE)
    warmup_policy: str = choice("policy", WARMUP_POLICIES)
    total_steps_per_task: int = ruled(1_500_000, POSITIVE)


@dataclass
class BufferConfig:
    # per-task prioritized (the design's; RESULTS.md "Prioritized replay for multi-task SAC");
    # stratified is the reference's sampler, uniform within each task
    kind: str = choice("stratified_prioritized", BUFFERS)
    capacity: int = ruled(1_000_000, POSITIVE)
    batch_size_per_task: int = ruled(128, POSITIVE)
    memmap_above: int = ruled(2_000_000, NON_NEGATIVE)
    priority_alpha: float = ruled(0.6, UNIT_INTERVAL)
    # the importance-sampling exponent, annealed linearly from priority_beta to
    # priority_beta_final over the frames after the warm-up
    priority_beta: float = ruled(0.4, UNIT_INTERVAL)
    priority_beta_final: float = ruled(1.0, UNIT_INTERVAL)
    # stratified_prioritized: a TD priority is capped at this times its task's median in the batch
    max_priority_ratio: typing.Optional[float] = ruled(10.0, ONE_OR_MORE)
    # An in-memory buffer is saved in every checkpoint (exact resume) or, when false, left out
    # and refilled after resuming. A memory-mapped one always resumes from its files.
    in_checkpoint: bool = True


@dataclass
class EvalConfig:
    interval_rounds: int = ruled(50, POSITIVE)
    episodes_per_task: int = ruled(32, NON_NEGATIVE)


@dataclass
class LogConfig:
    backend: str = choice("csv", LOGGERS)
    root: str = "runs"
    name: str = ""
    checkpoint_interval_rounds: int = ruled(50, POSITIVE)
    progress_bar: bool = True


@dataclass
class CompileConfig:
    """``enabled``: ``torch.compile`` the update (``mode``/``backend`` passed on);
    ``cudagraphs``: capture the update in a CUDA graph (CUDA devices only);
    ``native_chain``: on the CPU, run the D2R module chain as one native C++ pass per
    direction, blocked over samples, and the routing as one native pass per sample
    (:mod:`~d2r_torchrl.modules.native_chain`, compiled on first use; the PyTorch path runs
    on CUDA, inside ``torch.compile`` or where it cannot be built): the fastest CPU update
    (benchmarks/RESULTS.md), so on by default."""

    enabled: bool = False
    mode: typing.Optional[str] = choice(None, COMPILE_MODES)
    backend: str = "inductor"
    cudagraphs: bool = False
    native_chain: bool = True


@dataclass
class RunConfig:
    seed: int = ruled(0, SEED)
    device: str = "auto"
    env: EnvConfig = field(default_factory=EnvConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """A configuration from :meth:`to_dict` output, e.g. an older run's ``config.json``:
        keys missing there take today's defaults (but ``buffer.priority_beta_final``, which
        keeps such a run's constant ``priority_beta``), keys of :data:`REMOVED_KEYS` are dropped."""
        values = {key: value for key, value in _flatten(data) if key not in REMOVED_KEYS}
        if "buffer.priority_beta" in values:  # runs from before annealing kept beta constant
            values.setdefault("buffer.priority_beta_final", values["buffer.priority_beta"])
        return _updated(cls(), values)


def preset(algorithm: str, benchmark: str) -> RunConfig:
    """Reference hyper-parameters (METHOD.md section 5) for an algorithm on MT10 or MT50."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"Unknown algorithm {algorithm!r}; accepted: {list(ALGORITHMS)}.")
    if benchmark not in ("MT10", "MT50"):
        raise ConfigError(f"Presets exist for 'MT10' and 'MT50', got {benchmark!r}.")
    config = RunConfig()
    config.env.benchmark = benchmark
    config.network.architecture = algorithm
    config.loss.loss_balancing = algorithm in ("d2r", "soft_modular")
    if benchmark == "MT50":
        config.buffer.capacity = 10_000_000
        config.collector.total_steps_per_task = 1_000_000
        config.network.soft_modular_preset = "deep"
        # The 10M-transition buffer is memory-mapped (resumed from its files); held in memory
        # (buffer.memmap_above raised) it would be ~5 GB per checkpoint: refill it instead.
        config.buffer.in_checkpoint = False
    validate(config)
    return config


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``config`` with ``section.field=value`` strings applied (OmegaConf converts each value
    to its field's type; ``none`` or ``null`` is None); raises :class:`ConfigError` with one
    line for a malformed item, an unknown key or a value of the wrong type."""
    values = {}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"Override {override!r} is not of the form key=value.")
        key, raw = (part.strip() for part in override.split("=", 1))
        values[key] = None if raw.lower() in ("none", "null") else raw.strip('"')
    return _updated(config, values)


def _updated(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of ``config`` with ``values`` (dotted keys) set through OmegaConf, which checks
    each against its dataclass field."""
    merged = OmegaConf.structured(config)
    for key, value in values.items():
        try:
            OmegaConf.update(merged, key, value, force_add=False)
        except (ConfigKeyError, ConfigAttributeError):
            raise _unknown_key(key) from None
        except ValidationError:
            kind = _field_type(key)
            expected = f"one of its fields, as {key}.<field>=..." if dataclasses.is_dataclass(kind) else _type_name(kind)
            raise ConfigError(f"Invalid value {value!r} for {key}: expected {expected}") from None
    return OmegaConf.to_object(merged)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _unknown_key(key: str) -> ConfigError:
    known = [name for name, _ in _flatten(RunConfig().to_dict())]
    return ConfigError(f"Unknown config key {key!r}; accepted keys: {', '.join(known)}.")


def _field_type(key: str) -> Any:
    """The annotated type of the dotted ``key``; :class:`ConfigError` for an unknown key."""
    target: Any = RunConfig
    for name in key.split("."):
        hints = typing.get_type_hints(target) if dataclasses.is_dataclass(target) else {}
        if name not in hints:
            raise _unknown_key(key)
        target = hints[name]
    return target


def _type_name(kind: Any) -> str:
    args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return f"{args[0].__name__} or none" if args else kind.__name__


def differences(old: dict[str, Any], new: dict[str, Any], ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two :meth:`RunConfig.to_dict` dicts, with
    ``(old, new)``, both read as :meth:`RunConfig.from_dict` does (a key one side lacks takes
    today's default; removed keys are dropped)."""
    flat_old, flat_new = (dict(_flatten(RunConfig.from_dict(side).to_dict())) for side in (old, new))
    return {
        key: (flat_old[key], flat_new[key])
        for key in sorted(flat_old)
        if key not in ignore and flat_old[key] != flat_new[key]
    }


def resume_overrides(config: RunConfig) -> list[str]:
    """``key=value`` for every :data:`RESUME_OVERRIDES` key of ``config``: what a resumed run
    takes over from a newly planned configuration."""
    values = dict(_flatten(config.to_dict()))
    return [f"{key}={json.dumps(values[key])}" for key in RESUME_OVERRIDES]


def describe(config: RunConfig) -> str:
    """One line per option: ``key = value  (type)``, with the accepted values of a choice, for
    ``--help``."""
    return "\n".join(
        f"  {key} = {value!r}  ({_type_name(_field_type(key))}{_accepted(key)})" for key, value in _flatten(config.to_dict())
    )


def _accepted(key: str) -> str:
    """``": a, b, c"`` when the field ``key`` is a choice, else ``""``."""
    section, _, name = key.rpartition(".")
    owner = _field_type(section) if section else RunConfig
    accepted = {item.name: item.metadata.get("accepted") for item in dataclasses.fields(owner)}[name]
    return f": {', '.join(map(str, accepted))}" if accepted else ""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _broken_rules(config: Any, prefix: str = "") -> list[str]:
    """``"key=value rule"`` for every field of ``config`` (recursively) whose value is a
    non-finite float or breaks the rule in its metadata."""
    broken = []
    for item in dataclasses.fields(config):
        value, key = getattr(config, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            broken.extend(_broken_rules(value, f"{key}."))
        elif isinstance(value, float) and not math.isfinite(value):
            broken.append(f"{key}={value!r} must be a finite number")
        elif "rule" in item.metadata and not item.metadata["rule"][0](value):
            broken.append(f"{key}={value!r} {item.metadata['rule'][1]}")
    return broken


def _check_device(name: str) -> None:
    """``auto``, ``cpu`` or ``cuda[:N]``, parsed as torch does (whether the device exists is
    checked by :func:`~d2r_torchrl.training.builders.resolve_device`)."""
    refused = ConfigError(f"Invalid device={name!r}; accepted: auto, cpu, cuda or cuda:N (N >= 0).")
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise refused from None
    if device.type not in ("cpu", "cuda"):
        raise refused


def _check_compile_backend(backend: str) -> None:
    from torch._dynamo import list_backends

    known = list_backends(exclude_tags=())
    _require(backend in known, f"compile.backend={backend!r} is not a torch.compile backend; accepted: {', '.join(known)}.")


def validate(config: RunConfig) -> RunConfig:
    """Check every value before any work starts; raises :class:`ConfigError`."""
    broken = _broken_rules(config)
    _require(not broken, f"Invalid configuration: {'; '.join(broken)}.")
    try:
        tasks = resolve_tasks(config.env.benchmark)
    except ValueError as error:
        raise ConfigError(f"env.benchmark: {error}") from None
    _check_device(config.device)
    if config.compile.enabled:
        _check_compile_backend(config.compile.backend)
    if config.collector.kind == "ray":
        from d2r_torchrl.training.ray_collector import require_ray

        require_ray()
    _require(
        not (config.compile.cudagraphs and config.device.split(":")[0] == "cpu"),
        "compile.cudagraphs=true needs a CUDA device; got device=cpu (use device=cuda or auto on a GPU machine).",
    )
    _require(
        config.network.top_k <= config.network.num_modules,
        f"network.top_k={config.network.top_k} must not exceed network.num_modules={config.network.num_modules}.",
    )
    workers = min(config.collector.num_workers, len(tasks))
    _require(
        config.collector.kind == "sync" or len(tasks) % workers == 0,
        f"collector.num_workers={config.collector.num_workers} must divide the {len(tasks)} tasks "
        "(each worker steps an equal slice of them).",
    )
    _require(
        not (config.buffer.kind.startswith("stratified") and config.collector.kind == "multi_async"),
        f"buffer.kind={config.buffer.kind} needs every task in every collected batch; use collector.kind "
        "'sync' or 'multi_sync' with it.",
    )
    for key, on in (("loss.clip_td_target", config.loss.clip_td_target), ("network.critic_value_bins", config.network.critic_value_bins)):
        _require(
            not (on and config.loss.max_log_alpha is None),
            f"{key}={on} needs loss.max_log_alpha (a cap on the temperature) to bound the entropy "
            f"bonus in the return; set a cap or turn {key} off.",
        )
    warmup_frames = config.collector.warmup_rounds * config.collector.steps_per_task * len(tasks)
    _require(
        config.buffer.capacity > warmup_frames,
        f"buffer.capacity={config.buffer.capacity} must exceed the {warmup_frames} warm-up frames "
        "(collector.warmup_rounds x collector.steps_per_task x tasks), or no update would ever run.",
    )
    return config
