"""Check for torchrl's compiled extension, which only the prioritized replay buffers need
(``buffer.kind=stratified_prioritized``, the default, and ``prioritized``)."""
from __future__ import annotations


class MissingExtensionError(ImportError):
    """``torchrl._torchrl`` cannot load, so a prioritized replay buffer cannot be built."""


def require_torchrl_extension() -> None:
    """Raise :class:`MissingExtensionError` naming the cause and the fixes if
    ``torchrl._torchrl`` cannot load. Importing ``d2r_torchrl`` never calls this: only
    building a prioritized buffer does."""
    try:
        import torchrl._torchrl  # noqa: F401
    except ImportError as error:
        import torch
        import torchrl

        raise MissingExtensionError(
            "torchrl's compiled extension (torchrl._torchrl) failed to load, so the prioritized replay "
            "buffers (buffer.kind=stratified_prioritized, the default, and prioritized) cannot work. "
            f"Installed: torch {torch.__version__}, torchrl {torchrl.__version__}. "
            "Either use buffer.kind=stratified (the reference's per-task uniform sampler) or "
            "buffer.kind=uniform, which need no extension, or install "
            "versions built for each other: torchrl 0.14 is built against torch 2.15, "
            "`pip install 'torch==2.15.*' 'torchrl==0.14.*' 'tensordict==0.14.*'` "
            f"(original error: {error})."
        ) from error
