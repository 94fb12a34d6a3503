#!/bin/bash
# @@{title}
# Rendered by `python -m launch.slurm`; render it again rather than editing it.
@@{sbatch_lines}

# Preemption reaches the run by one of three paths (README, "Slurm"):
# - SIGUSR1 to this shell, @@{signal_lead_s} s before the time limit (--signal=B:USR1@...) or from
#   `scancel --signal=USR1 --batch`: forwarded to the step.
# - SIGTERM to the step alone (`scancel -s TERM`, preemption with a GraceTime): Slurm signals
#   every process of the step itself.
# - SIGTERM to the step and to this shell (`scontrol requeue`, `scancel`, preemption without a
#   grace time): Slurm is ending the job, and requeues it or not by itself.
# Every process of the step hears the signal; the trainer saves at its next step boundary, rank 0
# writes $HVL_PREEMPTED_FILE once the checkpoint is complete, and every node's launch.step exits 0
# (not the trainer's 75). So the file, not the exit code, tells a stop from the end of the run:
# when the step ends with exit 0 and that file, this script requeues the job unless Slurm is
# already ending it.
# A crash (a node's step exits non-zero) ends the other nodes at once (srun --kill-on-bad-exit=1)
# and fails the job without a requeue: a requeued crash would most likely crash again.
set -euo pipefail

readonly EXIT_PREEMPTED=@@{exit_preempted}
readonly RUN_DIR=@@{run_dir}
export PYTHONPATH=@@{project_root}${PYTHONPATH:+:${PYTHONPATH}}
# Written by the step when it stopped for preemption with its state saved; fresh for each start
# (a requeued job keeps its id), so only this start's step can have written it.
export HVL_PREEMPTED_FILE="${RUN_DIR}/logs/.preempted-${SLURM_JOB_ID}"
rm -f "${HVL_PREEMPTED_FILE}"
readonly RESTARTS=${SLURM_RESTART_COUNT:-0}

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
# srun passes the signal on to every process of the step.
# shellcheck disable=SC2329  # called by the trap below
forward_usr1() {
  got_usr1=1
  echo "$(date -Is) SIGUSR1: asking the step to save and stop" >&2
  if [[ -n "${step_pid}" ]]; then
    kill -USR1 "${step_pid}" 2>/dev/null || true
  fi
}
# Not forwarded: Slurm has signalled the step already. Trapping it keeps this shell (and so srun)
# alive while the step saves.
# shellcheck disable=SC2329  # called by the trap below
note_term() {
  got_term=1
  echo "$(date -Is) SIGTERM: Slurm is ending the job (cancel, requeue or preemption); waiting for the step" >&2
}
trap forward_usr1 USR1
trap note_term TERM

# Slurm's restart count of this job now (empty when scontrol cannot say): above RESTARTS once
# Slurm has requeued the job itself.
restarts_now() {
  timeout 10 scontrol -o show job "${SLURM_JOB_ID}" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2 || true
}
requeued_by_slurm() {
  local now
  now=$(restarts_now)
  [[ -n "${now}" ]] && (( now > RESTARTS ))
}

# launch.step is torchrun, leaving stop signals to the workers and ending in one line, no traceback.
# --kill-on-bad-exit=1: the first node to fail ends the others (SIGTERM, SIGKILL after KillWait)
# instead of leaving them in a collective until its timeout. A node stopped for preemption exits
# 0 (launch.step), so it never ends the others while they still write their part of the checkpoint.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
@@{srun_options}  @@{python} -m launch.step \
  --nnodes="${SLURM_NNODES}" --nproc-per-node=@@{procs_per_node} \
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

saved=""
if [[ -f "${HVL_PREEMPTED_FILE}" ]]; then
  saved=$(<"${HVL_PREEMPTED_FILE}")
  rm -f "${HVL_PREEMPTED_FILE}"
fi
if [[ -z "${saved}" ]] && (( step_rc == 0 )); then
  echo "$(date -Is) the step finished"
  exit 0
fi
if requeued_by_slurm; then
  echo "$(date -Is) the step stopped (${saved:-exit ${step_rc}}); Slurm is requeueing job" \
    "${SLURM_JOB_ID} itself, and it resumes from the latest checkpoint" >&2
  exit 0
fi
if (( step_rc != 0 )); then
  # A marker beside a failure is no reason to requeue: srun ending the other nodes after a crash
  # signals them with SIGTERM, and a rank still starting up stops "for preemption" on it.
  echo "$(date -Is) the step failed with exit code ${step_rc}${saved:+ (a rank stopped: ${saved})};" \
    "not requeueing" >&2
  exit "${step_rc}"
fi
if (( got_term && ! got_usr1 )); then
  echo "$(date -Is) the step stopped for preemption (${saved}), but job ${SLURM_JOB_ID} is being cancelled;" \
    "not requeueing (submit it again to resume)" >&2
  exit "${EXIT_PREEMPTED}"
fi
echo "$(date -Is) the step stopped for preemption (${saved}); requeueing job ${SLURM_JOB_ID}" >&2
trap 'exit 0' TERM
if ! out=$(timeout 30 scontrol requeue "${SLURM_JOB_ID}" 2>&1); then
  if requeued_by_slurm; then
    echo "$(date -Is) Slurm has requeued job ${SLURM_JOB_ID} itself meanwhile" >&2
    exit 0
  fi
  echo "$(date -Is) scontrol requeue failed (${out}); submit the job again to resume" >&2
  exit "${EXIT_PREEMPTED}"
fi
# The requeue ends this shell with SIGTERM: wait for it. A shell that is gone by then races the
# requeue's kill, and slurmd may refuse the restart ("Job N already killed, do not launch").
sleep 120 &
wait $! || true
exit 0
