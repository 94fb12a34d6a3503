#!/bin/bash
# @@{title}
# Rendered by `python -m launch.slurm`; render it again rather than editing it.
@@{sbatch_lines}

# Preemption: the trainer saves at its next step boundary on SIGUSR1 or SIGTERM and exits.
# Slurm sends this shell SIGUSR1 @@{signal_lead_s} s before the time limit (--signal=B:USR1@...); it is
# forwarded to the step, and once the step has stopped the job requeues itself and resumes
# from <run.dir>/checkpoints/latest. SIGTERM means the job is being cancelled or preempted:
# Slurm signals the step itself, and requeues a preempted --requeue job on its own.
set -euo pipefail

readonly EXIT_PREEMPTED=@@{exit_preempted}
readonly RUN_DIR=@@{run_dir}
export PYTHONPATH=@@{project_root}${PYTHONPATH:+:${PYTHONPATH}}

# The first node hosts torchrun's c10d rendezvous. The port comes from the job id so jobs that
# share a node do not collide; a requeued job keeps its id and so its port.
mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
if (( ${#nodes[@]} == 0 )); then
  echo "scontrol show hostnames gave no nodes for SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST}" >&2
  exit 1
fi
MASTER_ADDR=${nodes[0]}
MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
export MASTER_ADDR MASTER_PORT
echo "$(date -Is) job ${SLURM_JOB_ID} start $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on ${SLURM_NNODES} node(s)," \
  "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"

step_pid=""
got_usr1=0
got_term=0
# srun passes the signal to every process of the step; torchrun hands it on to its workers
# (--signals-to-handle) and waits --shutdown-timeout seconds for them to save and exit.
# shellcheck disable=SC2329  # called by the trap below
forward_usr1() {
  got_usr1=1
  echo "$(date -Is) SIGUSR1: asking the step to save and stop" >&2
  if [[ -n "${step_pid}" ]]; then
    kill -USR1 "${step_pid}" 2>/dev/null || true
  fi
}
# Not forwarded: the step already has it from Slurm, and a second SIGTERM would cut torchrun's
# graceful shutdown short. Trapping it keeps this shell (and so srun) alive while the step saves.
# shellcheck disable=SC2329  # called by the trap below
note_term() {
  got_term=1
  echo "$(date -Is) SIGTERM: the job is being cancelled or preempted; waiting for the step" >&2
}
trap forward_usr1 USR1
trap note_term TERM

# --kill-on-bad-exit=0: a node whose torchrun exits first (say, right after a preemption save)
# must not take down the others while they still write; a crash elsewhere ends them through
# the collective timeout instead.
srun --ntasks-per-node=1 --kill-on-bad-exit=0 \
@@{srun_options}  @@{python} -m torch.distributed.run \
  --nnodes="${SLURM_NNODES}" --nproc-per-node=@@{gpus_per_node} \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${SLURM_JOB_ID}" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=@@{signal_lead_s} \
  @@{train_command}@@{overrides} &
step_pid=$!

# A trapped signal makes `wait` return early (status > 128) while the step still runs.
while :; do
  step_rc=0
  wait "${step_pid}" || step_rc=$?
  kill -0 "${step_pid}" 2>/dev/null || break
done

if (( step_rc == 0 )); then
  echo "$(date -Is) the step finished"
  exit 0
fi
# torchrun reports a worker's exit code as 1, so the SIGUSR1 seen here is what marks a
# preemption stop; EXIT_PREEMPTED covers a step that does pass the trainer's code through.
if (( got_usr1 )) || { (( step_rc == EXIT_PREEMPTED )) && (( ! got_term )); }; then
  echo "$(date -Is) the step stopped for preemption (exit ${step_rc}); requeueing job ${SLURM_JOB_ID}" >&2
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
echo "$(date -Is) the step failed with exit code ${step_rc}; not requeueing" >&2
exit "${step_rc}"
