"""Task-id handling shared by the multi-task networks."""
from __future__ import annotations

import torch
from torch import nn


def flatten_task_id(task_id: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """Accept ``[*B]`` or ``[*B, 1]`` integer task ids and return ``[*B]`` long."""
    if task_id.shape == (*batch_shape, 1):
        task_id = task_id.squeeze(-1)
    if task_id.shape != batch_shape:
        raise ValueError(
            f"task_id has shape {tuple(task_id.shape)}; expected {tuple(batch_shape)} "
            f"or {(*batch_shape, 1)} to match the input features."
        )
    return task_id.long()


def host_checks_apply(tensor: torch.Tensor) -> bool:
    """Whether a check that reads ``tensor``'s values on the host may run: not while tracing
    with ``torch.compile`` or capturing a CUDA graph, and not on an empty tensor."""
    if torch.compiler.is_compiling() or tensor.numel() == 0:
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_task_range(task_id: torch.Tensor, num_tasks: int) -> None:
    """Raise ``ValueError`` when a task id is outside ``[0, num_tasks)``.

    Skipped while tracing with ``torch.compile`` or capturing a CUDA graph (it reads data on
    the host).
    """
    if not host_checks_apply(task_id):
        return
    low, high = int(task_id.min()), int(task_id.max())
    if low < 0 or high >= num_tasks:
        raise ValueError(
            f"task_id out of range: got values in [{low}, {high}], the network was built "
            f"for {num_tasks} tasks (ids 0..{num_tasks - 1})."
        )


def check_features(features: torch.Tensor, in_features: int, what: str) -> None:
    if features.shape[-1] != in_features:
        raise ValueError(
            f"{what} has width {features.shape[-1]}; the network expects {in_features} "
            "(observation width, plus action width for a critic)."
        )


class TaskEmbedding(nn.Linear):
    """``Linear(T, width)`` applied to the one-hot of ``task_id``, computed as a lookup in the
    ``[T, width]`` table ``weight^T + bias`` (one row per task, so the bias is added ``T``
    times rather than once per sample; ``test_d2r_network`` checks it against the one-hot
    product)."""

    def forward(self, task_id: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return nn.functional.embedding(task_id, self.weight.t() + self.bias)
