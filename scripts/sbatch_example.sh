#!/bin/bash
# One pipeline run as a SLURM batch job, without submitit (see docs/cluster.md).
#
#   sbatch scripts/sbatch_example.sh                                    # CPU: 1 task, 2 CPUs
#   sbatch scripts/sbatch_example.sh data=cifar10 model=wide_resnet28_2  # overrides pass through
#   sbatch --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8 \
#       scripts/sbatch_example.sh data=cifar10                           # 4 GPUs, 4 DDP ranks
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8 \
#       scripts/sbatch_example.sh data=cifar10                           # 2 nodes x 4 GPUs
#
# As written it asks for nothing a CPU partition lacks; sbatch options on the command line take
# precedence over the #SBATCH lines below. srun starts one task per device and every task is
# one DDP rank: the pipeline reads SLURM's environment, starts no process itself, and Lightning
# re-executes nothing. Give as many tasks per node as GPUs per node: the tasks per node become
# trainer.devices, and Lightning refuses a mismatch. The accelerator follows the allocation (gpu
# when SLURM gave the job GPUs, else cpu); torch uses --cpus-per-task threads per task.
#
# Signals (what SLURM 22.05 sends, measured in tests/test_slurm.py):
# - USR2, 120 s before the time limit (--signal): the ranks save checkpoints/last.ckpt at the
#   next training step and stop; rank 0 requeues the job (scontrol requeue) while it has
#   restarted fewer than MAX_REQUEUES times (SLURM_RESTART_COUNT), else the job ends FAILED
#   with its state saved (submit it again to go on);
# - TERM, on preemption, `scontrol requeue` or `scancel`: the ranks save, then stop where
#   SLURM has already decided (SLURM requeues a preempted or requeued job, --requeue, and
#   leaves a cancelled one cancelled); preempted on a partition with a GraceTime, rank 0
#   requeues the job itself (PreemptMode=REQUEUE, under MAX_REQUEUES) or every rank waits for
#   SLURM to end it, so that the job is not recorded FAILED (docs/cluster.md).
# The requeued job starts again with the same arguments, hence the same run_dir, and resumes
# from its finished artifacts and last.ckpt (overwrite=true does not clear a requeued job).
# A job that fails exits non-zero: SLURM records it FAILED (sacct, --dependency=afterok).
#
#SBATCH --job-name=selftrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
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

# How many times a job that keeps reaching its time limit is requeued (then it ends FAILED).
MAX_REQUEUES="${MAX_REQUEUES:-20}"
TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}"
TASKS_PER_NODE="${TASKS_PER_NODE%%(*}" # "2(x2)" on several nodes: the count per node
ACCELERATOR=cpu
if [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ]; then ACCELERATOR=gpu; fi

echo "job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES} node(s) x ${TASKS_PER_NODE} task(s)," \
    "${ACCELERATOR}, restart ${SLURM_RESTART_COUNT:-0} of at most ${MAX_REQUEUES}"

# No run_dir given: the default (outputs/<stage>/<overrides>/seed<seed>) comes from the command
# line, so it is the same in every task and after a requeue. With -m, pass a fixed
# hydra.sweep.dir=multirun/NAME: the default sweep dir reads the clock, once per task.
# Your overrides come last: they win over these.
srun --kill-on-bad-exit=1 python -m pipeline \
    trainer.accelerator="${ACCELERATOR}" \
    trainer.strategy=ddp \
    trainer.devices="${TASKS_PER_NODE}" \
    trainer.num_nodes="${SLURM_JOB_NUM_NODES}" \
    max_requeues="${MAX_REQUEUES}" \
    progress=false \
    "$@"
