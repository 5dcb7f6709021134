# Sourced by the sbatch scripts beside it (submit them from the repository root, as every path in them assumes).
#
# srun_or_requeue COMMAND...   `srun --kill-on-bad-exit=1 COMMAND...`: one task per allocated slot, and a task that
#                              fails takes the whole step down at once instead of leaving the others waiting in a
#                              collective. When the step exits with megaseg's preemption code (a trainer got
#                              SIGUSR1 from `#SBATCH --signal=USR1@...` or SIGTERM, saved a checkpoint at the step
#                              boundary and stopped), the job requeues itself; the rerun of this script resumes from
#                              that checkpoint (checkpoint.resume=true). Any other failure fails the job.

# megaseg.training.common.loop.PREEMPTED_EXIT_CODE (EX_TEMPFAIL).
MEGASEG_PREEMPTED_EXIT_CODE=75

srun_or_requeue() {
    local code=0
    srun --kill-on-bad-exit=1 "$@" || code=$?
    if [ "$code" -eq "$MEGASEG_PREEMPTED_EXIT_CODE" ]; then
        echo "megaseg: preempted, checkpoint saved; requeueing job ${SLURM_JOB_ID} (restart $((${SLURM_RESTART_COUNT:-0} + 1)))" >&2
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return "$code"
}
