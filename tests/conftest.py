"""Test-wide settings: one torch thread per process (the tests run small networks, and
subprocesses and Ray workers share the machine's cores)."""
import torch

torch.set_num_threads(1)
