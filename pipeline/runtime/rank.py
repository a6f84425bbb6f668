"""One DDP rank of a job started by runtime.launch: `python -m pipeline.runtime.rank CONFIG.yaml`."""

import sys

from omegaconf import OmegaConf

from pipeline.cli import run_resolved

if __name__ == "__main__":
    sys.exit(run_resolved(OmegaConf.load(sys.argv[1]), started_ranks=True))
