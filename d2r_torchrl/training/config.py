"""Run configuration: dataclass sections, reference presets and dotted overrides.

Override any field from the command line as ``section.field=value``
(``loss.gamma=0.98``, ``env.benchmark=MT50``, ``loss.max_log_alpha=none``).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

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
    "compile.chain_kernels",
    "compile.native_chain",
)


class ConfigError(ValueError):
    """A configuration key or value is not accepted."""


@dataclass
class EnvConfig:
    benchmark: str = "MT10"
    goals: str = "random"
    max_episode_steps: int = 200
    reward_scale: float = 0.1
    reward_function_version: str = "v2"
    execution: str = "serial"


@dataclass
class NetworkConfig:
    architecture: str = "d2r"
    num_modules: int = 16
    module_width: int = 128
    top_k: int = 2
    soft_modular_preset: str = "shallow"


@dataclass
class LossConfig:
    gamma: float = 0.99
    loss_balancing: bool = True
    alpha_init: float = 1.0
    max_log_alpha: typing.Optional[float] = 0.0
    extreme_loss_threshold: typing.Optional[float] = 3000.0
    extreme_loss_rule: str = "clip"
    time_limit_terminal: bool = False
    target_update_tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 1e-4
    grad_clip_norm: typing.Optional[float] = 1.0


@dataclass
class CollectorConfig:
    kind: str = "sync"
    num_workers: int = 2
    steps_per_task: int = 200
    updates_per_round: int = 200
    warmup_rounds: int = 20
    warmup_policy: str = "policy"
    total_steps_per_task: int = 1_500_000


@dataclass
class BufferConfig:
    kind: str = "stratified"  # the reference's sampler: uniform within each task
    capacity: int = 1_000_000
    batch_size_per_task: int = 128
    memmap_above: int = 2_000_000
    priority_alpha: float = 0.6
    # the importance-sampling exponent, annealed linearly from priority_beta to
    # priority_beta_final over the frames after the warm-up
    priority_beta: float = 0.4
    priority_beta_final: float = 1.0
    # stratified_prioritized: a TD priority is capped at this times its task's median in the batch
    max_priority_ratio: typing.Optional[float] = 10.0
    # An in-memory buffer is saved in every checkpoint (exact resume) or, when false, left out
    # and refilled after resuming. A memory-mapped one always resumes from its files.
    in_checkpoint: bool = True


@dataclass
class EvalConfig:
    interval_rounds: int = 50
    episodes_per_task: int = 32


@dataclass
class LogConfig:
    backend: str = "csv"
    root: str = "runs"
    name: str = ""
    checkpoint_interval_rounds: int = 50
    progress_bar: bool = True


@dataclass
class CompileConfig:
    """``enabled``: ``torch.compile`` the update (``mode``/``backend`` passed on);
    ``cudagraphs``: capture the update in a CUDA graph (CUDA devices only);
    ``native_chain``: on the CPU, run the D2R module chain as one native C++ pass per
    direction, blocked over samples, and the routing as one native pass per sample
    (:mod:`~d2r_torchrl.modules.native_chain`, compiled on first use; the PyTorch path runs
    on CUDA, inside ``torch.compile`` or where it cannot be built): the fastest CPU update
    (benchmarks/RESULTS.md), so on by default;
    ``chain_kernels``: compile the per-gate backward kernels of that per-gate path (fused
    gathers, products and scatters; see :class:`~d2r_torchrl.modules.module_chain.ChainKernels`):
    about 7% off a D2R update with one torch thread and without the native pass, nothing
    with two, so off by default."""

    enabled: bool = False
    mode: typing.Optional[str] = None
    backend: str = "inductor"
    cudagraphs: bool = False
    chain_kernels: bool = False
    native_chain: bool = True


@dataclass
class RunConfig:
    seed: int = 0
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
        config = cls()
        apply_overrides(config, [f"{key}={json.dumps(value)}" for key, value in _flatten(data)])
        return config


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


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def differences(old: dict[str, Any], new: dict[str, Any], ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two :meth:`RunConfig.to_dict` dicts, with
    ``(old, new)``; a key missing on one side shows as ``"(absent)"``."""
    flat_old, flat_new = dict(_flatten(old)), dict(_flatten(new))
    changed = {}
    for key in sorted(flat_old.keys() | flat_new.keys()):
        pair = (flat_old.get(key, "(absent)"), flat_new.get(key, "(absent)"))
        if key not in ignore and pair[0] != pair[1]:
            changed[key] = pair
    return changed


def resume_overrides(config: RunConfig) -> list[str]:
    """``key=value`` for every :data:`RESUME_OVERRIDES` key of ``config``: what a resumed run
    takes over from a newly planned configuration."""
    values = dict(_flatten(config.to_dict()))
    return [f"{key}={json.dumps(values[key])}" for key in RESUME_OVERRIDES]


def describe(config: RunConfig) -> str:
    """One line per option: ``key = value  (type)``, for ``--help``."""
    lines = []
    for key, value in _flatten(config.to_dict()):
        kind = _field_type(config, key.split("."))
        lines.append(f"  {key} = {value!r}  ({getattr(kind, '__name__', str(kind))})")
    return "\n".join(lines)


def _field_type(config: Any, path: list[str]) -> Any:
    target = config
    for name in path[:-1]:
        target = getattr(target, name)
    return typing.get_type_hints(type(target))[path[-1]]


def _parse(raw: str, kind: Any, key: str) -> Any:
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        if raw.strip().lower() in ("none", "null"):
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            return int(float(raw)) if float(raw).is_integer() else int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw.strip('"')
    except ValueError:
        pass
    raise ConfigError(f"Invalid value {raw!r} for {key}: expected {getattr(kind, '__name__', kind)}.")


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """Apply ``section.field=value`` strings in place; unknown keys raise :class:`ConfigError`."""
    known = [key for key, _ in _flatten(config.to_dict())]
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"Override {override!r} is not of the form key=value.")
        key, raw = override.split("=", 1)
        key = key.strip()
        if key not in known:
            raise ConfigError(f"Unknown config key {key!r}; accepted keys: {', '.join(known)}.")
        path = key.split(".")
        target = config
        for name in path[:-1]:
            target = getattr(target, name)
        setattr(target, path[-1], _parse(raw, _field_type(config, path), key))
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(key: str, value: Any, accepted: Sequence[Any]) -> None:
    _require(value in accepted, f"Invalid {key}={value!r}; accepted: {list(accepted)}.")


def validate(config: RunConfig) -> RunConfig:
    """Check every value before any work starts; raises :class:`ConfigError`."""
    from d2r_torchrl.envs.metaworld import EXECUTION_MODES, GOAL_MODES, REWARD_VERSIONS, resolve_tasks
    from d2r_torchrl.objectives.multitask_sac import EXTREME_LOSS_RULES

    try:
        tasks = resolve_tasks(config.env.benchmark)
    except ValueError as error:
        raise ConfigError(f"env.benchmark: {error}") from None
    _choice("device", config.device.split(":")[0], ("auto", "cpu", "cuda"))
    _choice("env.goals", config.env.goals, GOAL_MODES)
    _choice("env.execution", config.env.execution, EXECUTION_MODES)
    _choice("loss.extreme_loss_rule", config.loss.extreme_loss_rule, EXTREME_LOSS_RULES)
    _choice("env.reward_function_version", config.env.reward_function_version, REWARD_VERSIONS)
    _choice("network.architecture", config.network.architecture, ALGORITHMS)
    _choice("network.soft_modular_preset", config.network.soft_modular_preset, ("shallow", "deep"))
    _choice("collector.kind", config.collector.kind, COLLECTORS)
    if config.collector.kind == "ray":
        from d2r_torchrl.training.ray_collector import require_ray

        require_ray()
    _choice("collector.warmup_policy", config.collector.warmup_policy, WARMUP_POLICIES)
    _choice("buffer.kind", config.buffer.kind, BUFFERS)
    _choice("log.backend", config.log.backend, LOGGERS)
    _choice("compile.mode", config.compile.mode, COMPILE_MODES)
    _require(
        not (config.compile.cudagraphs and config.device.split(":")[0] == "cpu"),
        "compile.cudagraphs=true needs a CUDA device; got device=cpu (use device=cuda or auto on a GPU machine).",
    )
    positive = {
        "env.max_episode_steps": config.env.max_episode_steps,
        "env.reward_scale": config.env.reward_scale,
        "network.num_modules": config.network.num_modules,
        "network.module_width": config.network.module_width,
        "network.top_k": config.network.top_k,
        "loss.alpha_init": config.loss.alpha_init,
        "loss.actor_lr": config.loss.actor_lr,
        "loss.critic_lr": config.loss.critic_lr,
        "loss.alpha_lr": config.loss.alpha_lr,
        "collector.num_workers": config.collector.num_workers,
        "collector.steps_per_task": config.collector.steps_per_task,
        "collector.total_steps_per_task": config.collector.total_steps_per_task,
        "buffer.capacity": config.buffer.capacity,
        "buffer.batch_size_per_task": config.buffer.batch_size_per_task,
        "eval.interval_rounds": config.eval.interval_rounds,
        "log.checkpoint_interval_rounds": config.log.checkpoint_interval_rounds,
    }
    for key, value in positive.items():
        _require(value > 0, f"{key} must be positive, got {value!r}.")
    for key, value in {
        "collector.updates_per_round": config.collector.updates_per_round,
        "collector.warmup_rounds": config.collector.warmup_rounds,
        "eval.episodes_per_task": config.eval.episodes_per_task,
    }.items():
        _require(value >= 0, f"{key} must be >= 0, got {value!r}.")
    _require(
        config.network.top_k <= config.network.num_modules,
        f"network.top_k={config.network.top_k} must not exceed network.num_modules={config.network.num_modules}.",
    )
    for key in ("priority_alpha", "priority_beta", "priority_beta_final"):
        value = getattr(config.buffer, key)
        _require(0 <= value <= 1, f"buffer.{key} must be in [0, 1], got {value}.")
    ratio = config.buffer.max_priority_ratio
    _require(ratio is None or ratio >= 1, f"buffer.max_priority_ratio must be >= 1 or none, got {ratio}.")
    _require(0 < config.loss.gamma <= 1, f"loss.gamma must be in (0, 1], got {config.loss.gamma}.")
    _require(
        0 < config.loss.target_update_tau <= 1,
        f"loss.target_update_tau must be in (0, 1], got {config.loss.target_update_tau}.",
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
    warmup_frames = config.collector.warmup_rounds * config.collector.steps_per_task * len(tasks)
    _require(
        config.buffer.capacity > warmup_frames,
        f"buffer.capacity={config.buffer.capacity} must exceed the {warmup_frames} warm-up frames "
        "(collector.warmup_rounds x collector.steps_per_task x tasks), or no update would ever run.",
    )
    return config
