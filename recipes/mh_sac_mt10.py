"""MH-SAC on Meta-World MT10 with the reference hyper-parameters.

    python recipes/mh_sac_mt10.py [--resume RUN_DIR] [key=value ...]   (--help lists the keys)
"""
import sys

from d2r_torchrl.training.cli import main

if __name__ == "__main__":
    sys.exit(main("mh_sac", "MT10"))
