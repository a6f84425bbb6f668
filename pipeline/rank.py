"""One DDP rank of a job started by pipeline.launch: `python -m pipeline.rank CONFIG.yaml`."""

import sys

from omegaconf import OmegaConf

from pipeline.cli import run_resolved

if __name__ == "__main__":
    sys.exit(run_resolved(OmegaConf.load(sys.argv[1]), started_ranks=True))
