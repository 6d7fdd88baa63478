"""Without torchrl's compiled extension the package still imports; only the prioritized
buffers refuse, with a message naming the cause and the fixes, and a run with the default
replay (per-task prioritized) stops in one line before its run directory exists."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A ``None`` entry in ``sys.modules`` makes ``import torchrl._torchrl`` raise ImportError,
# as a torchrl built against another torch does ("undefined symbol ...").
WITHOUT_EXTENSION = """
import json, sys
sys.modules["torchrl._torchrl"] = None
import torch
from tensordict import TensorDict
import d2r_torchrl
import d2r_torchrl.analysis, d2r_torchrl.envs, d2r_torchrl.modules, d2r_torchrl.objectives
import d2r_torchrl.training.trainer
from d2r_torchrl._extension import MissingExtensionError
from d2r_torchrl.data.replay import make_replay_buffer
from d2r_torchrl.training.cli import main

result = {}
try:
    make_replay_buffer("prioritized", capacity=40, batch_size=4, num_tasks=2)
except MissingExtensionError as error:
    result["prioritized_error"] = str(error)
buffer = make_replay_buffer("stratified", capacity=40, batch_size=8, num_tasks=2)
buffer.extend(TensorDict(task_id=torch.arange(10) % 2, observation=torch.randn(10, 3), batch_size=[10]))
result["stratified_counts"] = torch.bincount(buffer.sample()["task_id"], minlength=2).tolist()
result["recipe_exit_code"] = main("d2r", "MT10", sys.argv[1:])
print(json.dumps(result))
"""


def test_package_imports_without_extension_and_prioritized_buffer_explains(tmp_path):
    """The recipe runs with the default ``buffer.kind`` (``stratified_prioritized``)."""
    overrides = [
        "env.benchmark=reach-v3,push-v3",
        "buffer.capacity=1000",
        "collector.steps_per_task=10",
        "collector.warmup_rounds=1",
        "device=cpu",
        "log.progress_bar=false",
        f"log.root={tmp_path}",
    ]
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTENSION, *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    message = result["prioritized_error"]
    assert "torchrl._torchrl" in message and "buffer.kind=stratified" in message and "torch 2." in message
    assert result["stratified_counts"] == [4, 4]
    assert result["recipe_exit_code"] == 2
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "torchrl's compiled extension" in error_lines[0]
    assert "Traceback" not in completed.stderr
    assert list(tmp_path.iterdir()) == []  # refused before a run directory was made
