"""Checks run before any work (with :func:`builders.resolve_device`, which checks the device):
the run fits the memory, the run directory can be written and the disk can hold the replay
buffer and a checkpoint save. Each raises :class:`ConfigError` saying what to change."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from d2r_torchrl.data.replay import example_transitions, transition_bytes
from d2r_torchrl.modules.actor_critic import parameter_count
from d2r_torchrl.training import builders
from d2r_torchrl.training.checkpointing import GIB, SaveSize, size_text
from d2r_torchrl.training.config import ConfigError, RunConfig

FLOAT_BYTES = 4


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and write a probe file in it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise ConfigError(
            f"Cannot write to the run directory {run_dir} ({error.strerror or error}); choose another "
            "log.root or log.name."
        ) from None


def allocated_bytes(directory: Path) -> int:
    """Disk blocks already taken by the files under ``directory`` (sparse files count what
    was written, not their length)."""
    if not directory.exists():
        return 0
    return sum(file.stat().st_blocks * 512 for file in directory.rglob("*") if file.is_file())


def check_disk(
    run_dir: Path, *, capacity: int, bytes_per_transition: int, memory_mapped: bool, save_bytes: SaveSize
) -> None:
    """The disk under ``run_dir`` must hold a memory-mapped replay buffer's ``capacity``
    transitions (minus what its files already take when resuming) and what a checkpoint save
    writes while it runs (:class:`~checkpointing.SaveSize`: networks, optimisers, an in-memory
    buffer saved in checkpoints, priority trees; staged, then archived)."""
    parts, needed = [], save_bytes.needed
    if memory_mapped:
        files = max(capacity * bytes_per_transition - allocated_bytes(run_dir / "buffer"), 0)
        needed += files
        parts.append(
            f"a memory-mapped replay buffer of {capacity:,} transitions needs {files / GIB:.2f} GiB "
            f"({bytes_per_transition} bytes per transition)"
        )
    parts.append(save_bytes.describe())
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        in_memory_buffer = save_bytes.buffer and not memory_mapped
        raise ConfigError(
            f"Not enough disk space under {run_dir}: {' and '.join(parts)}; {size_text(free)} are free. Lower "
            "buffer.capacity, set log.root on a larger disk"
            + (", or set buffer.in_checkpoint=false to refill the buffer after resuming." if in_memory_buffer else ".")
        )


def available_memory() -> int:
    """Bytes of host memory available to a new allocation (``MemAvailable`` of /proc/meminfo,
    else the free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_needs(config: RunConfig, observation_dim: int, action_dim: int, num_tasks: int) -> dict[str, tuple[int, str]]:
    """Estimated bytes of what a run holds in memory, with the keys that set each:
    ``networks`` (actor: parameters, gradients and Adam's two moments; the twin critics
    the same plus their targets; D2R's module chain activations for one batch),
    ``buffer`` (an in-memory replay buffer at capacity) and ``batch`` (a collected batch and
    its stored copy)."""
    kwargs = builders.network_kwargs(config)
    arch = config.network.architecture
    actor = parameter_count(arch, observation_dim, num_tasks, 2 * action_dim, **kwargs)
    critic_outputs = config.network.critic_value_bins or 1  # a categorical critic: one logit per bin
    critic = parameter_count(arch, observation_dim + action_dim, num_tasks, critic_outputs, **kwargs)
    networks = FLOAT_BYTES * (4 * actor + 2 * 5 * critic)
    net = config.network
    keys = "network.architecture"
    if arch == "d2r":  # one batch through the actor and the twin critics and targets, kept for backward
        batch = config.buffer.batch_size_per_task * num_tasks
        networks += FLOAT_BYTES * 5 * batch * net.num_modules * net.module_width
        keys = f"network.num_modules={net.num_modules}, network.module_width={net.module_width}"
    needs = {"networks": (networks, keys)}
    if networks > available_memory():  # refuse before sizing transitions (their routes grow as N^2)
        return needs
    example = example_transitions(1, observation_dim, action_dim, _route_logits(config))
    per_transition = transition_bytes(config.buffer.kind, example, 1)
    if config.buffer.capacity <= config.buffer.memmap_above:
        needs["buffer"] = (
            config.buffer.capacity * per_transition,
            f"buffer.capacity={config.buffer.capacity:,} in memory up to buffer.memmap_above={config.buffer.memmap_above:,}",
        )
    frames = config.collector.steps_per_task * num_tasks
    needs["batch"] = (2 * frames * per_transition, f"collector.steps_per_task={config.collector.steps_per_task:,} x {num_tasks} tasks")
    return needs


def check_memory(
    config: RunConfig, observation_dim: int, action_dim: int, num_tasks: int, device: torch.device, *, buffer_given: bool
) -> None:
    """Refuse, with one line giving the estimates (:func:`memory_needs`) and the memory
    available, a run whose networks, in-memory replay buffer (unless ``buffer_given``) and
    collected batches cannot fit: on the host, or on the CUDA device for the networks and
    the buffer."""
    needs = memory_needs(config, observation_dim, action_dim, num_tasks)
    if buffer_given:
        needs.pop("buffer", None)
    on_device = ("networks", "buffer") if device.type == "cuda" else ()
    pools = {"host": ([key for key in needs if key not in on_device], available_memory())}
    if device.type == "cuda":
        pools[str(device)] = ([key for key in needs if key in on_device], torch.cuda.mem_get_info(device)[0])
    for pool, (keys, available) in pools.items():
        total = sum(needs[key][0] for key in keys)
        if total > available:
            listed = ", ".join(f"{key} {needs[key][0] / GIB:,.2f} GiB ({needs[key][1]})" for key in keys)
            raise ConfigError(
                f"Not enough memory: this run needs about {total / GIB:,.2f} GiB of {pool} memory ({listed}), "
                f"{available / GIB:,.2f} GiB are available. Lower the values named."
            )


def _route_logits(config: RunConfig) -> int | None:
    """``N(N+1)/2`` route logits stored per transition by a D2R actor, else None."""
    num_modules = config.network.num_modules
    return num_modules * (num_modules + 1) // 2 if config.network.architecture == "d2r" else None
