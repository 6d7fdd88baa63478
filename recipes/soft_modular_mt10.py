"""Soft-Modularization on Meta-World MT10 with the reference hyper-parameters.

    python recipes/soft_modular_mt10.py [--resume RUN_DIR] [key=value ...]   (--help lists the keys)
"""
import sys

from d2r_torchrl.training.cli import main

if __name__ == "__main__":
    sys.exit(main("soft_modular", "MT10"))
