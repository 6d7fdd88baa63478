"""Fail fast when torchrl's compiled extension (needed by prioritized replay) is missing."""
from __future__ import annotations


def require_torchrl_extension() -> None:
    """Raise ``ImportError`` naming the cause and the fix if ``torchrl._torchrl`` cannot load."""
    try:
        import torchrl._torchrl  # noqa: F401
    except ImportError as error:
        import torch
        import torchrl

        raise ImportError(
            "torchrl's compiled extension (torchrl._torchrl) failed to load, so prioritized "
            f"replay cannot work. Installed: torch {torch.__version__}, torchrl {torchrl.__version__}. "
            "torchrl 0.14 is built against torch 2.15: install matching versions with "
            "`pip install 'torch==2.15.*' 'torchrl==0.14.*' 'tensordict==0.14.*'` "
            f"(original error: {error})."
        ) from error
