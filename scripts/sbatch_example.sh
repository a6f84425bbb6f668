#!/bin/bash
# One pipeline run as a SLURM batch job, without submitit (see docs/cluster.md).
#
#   sbatch scripts/sbatch_example.sh                                   # the defaults below
#   sbatch scripts/sbatch_example.sh data=cifar10 model=wide_resnet28_2 # overrides pass through
#   sbatch --nodes=2 scripts/sbatch_example.sh data=cifar10             # 2 nodes x 4 GPUs
#
# srun starts one task per GPU and every task is one DDP rank: the pipeline reads SLURM's
# environment, starts no process itself, and Lightning re-executes nothing.
# Keep --ntasks-per-node equal to --gpus-per-node: it becomes trainer.devices, and Lightning
# refuses a mismatch.
#
# Time limit and preemption: SLURM sends USR2 to every task 120 s before the limit. The ranks
# save checkpoints/last.ckpt at the next training step and stop; rank 0 requeues the job
# (scontrol requeue). The job starts again with the same arguments, hence the same run_dir, and
# resumes from its finished artifacts and last.ckpt (overwrite=true does not clear a requeued job).
#
#SBATCH --job-name=selftrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Site-specific; or export SBATCH_PARTITION / SBATCH_ACCOUNT before calling sbatch.
##SBATCH --partition=gpu
##SBATCH --account=my_project

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# The environment from the README's install (adjust the path to yours).
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi

echo "job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES} node(s), restart ${SLURM_RESTART_COUNT:-0}"

# No run_dir given: the default (outputs/<stage>/<overrides>/seed<seed>) comes from the command
# line, so it is the same in every task and after a requeue. With -m, pass a fixed
# hydra.sweep.dir=multirun/NAME: the default sweep dir reads the clock, once per task.
srun --kill-on-bad-exit=1 python -m pipeline \
    trainer.accelerator=gpu \
    trainer.strategy=ddp \
    trainer.devices="${SLURM_NTASKS_PER_NODE}" \
    trainer.num_nodes="${SLURM_JOB_NUM_NODES}" \
    progress=false \
    "$@"
