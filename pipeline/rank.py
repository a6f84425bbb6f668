"""One DDP rank of a job started by runtime/launch.py: `python -m pipeline.rank CONFIG.yaml`.

It lives beside the entry point, not in runtime/: it runs the job as cli.py does, and runtime/
imports nothing from the layers above it (tests/test_layers.py).
"""

import sys

from omegaconf import OmegaConf

from pipeline.cli import run_resolved

if __name__ == "__main__":
    sys.exit(run_resolved(OmegaConf.load(sys.argv[1]), started_ranks=True))
