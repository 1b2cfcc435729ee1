#!/usr/bin/env bash
# One GPU slot, two results: the NVE energy-drift part of the certificate
# (protocols/campaign_nve_drift.toml: five policies x 16 seeds of the 648-atom water box,
# each policy's seeds batched in one task) run as a Dask campaign on one GPU, its
# comparison against fp64 (the drift against fp32's), and the campaign's throughput.
#
#   bash bench/nve_dask_campaign.sh OUT_DIR [COPY_DIR]
#
# OUT_DIR: the campaign (trajectories and checkpoints in OUT_DIR/nve_drift/, campaign.json,
# campaign.log, the comparison in OUT_DIR/nve_drift/comparison/) and
# dask_campaign_throughput.json. COPY_DIR: a flat copy of the eight files worth keeping,
# no trajectories. Running it again into the same OUT_DIR continues the runs.
#
# WALL_S (default 500): the script ends within about this many seconds. The campaign's
# tasks stop (--max-wall-s: each run with a checkpoint, the next start continues it)
# RESERVE_S (default 100) before that: time for the campaign command's imports, the
# comparison (~0.7 s per frame of all runs) and the report. A stopped run is compared up
# to the end of the shortest. If the campaign command hangs, it is killed (Dask workers
# too) 25 s after WALL_S, which leaves its runs resumable and the report still made.
# STEPS, LOG_EVERY, DEVICE, POLICIES and SEEDS (e.g. "0 1") override the campaign file.
# SCHEDULER (default cuda): one Dask worker on the GPU (dask-cuda); where dask-cuda does
# not import or its cluster does not start, --scheduler local with one worker process, and
# the throughput JSON says why.
set -uo pipefail  # no -e: whatever happens, the report and the copies are made
began=$SECONDS
out=${1:?usage: bash bench/nve_dask_campaign.sh OUT_DIR [COPY_DIR]}
copy=${2:-}
wall_s=${WALL_S:-500}
reserve_s=${RESERVE_S:-100}
mkdir -p "$out" ${copy:+"$copy"} || exit 2
out=$(cd "$out" && pwd) copy=${copy:+$(cd "$copy" && pwd)}
cd "$(dirname "$0")/.." || exit 2  # the campaign file's paths are relative to the root
campaign=$out/campaign_nve_drift.toml
python3 -m mace_lpcalc.perf.dask_campaign prepare protocols/campaign_nve_drift.toml \
  "$campaign" --out-dir "$out" ${STEPS:+--steps "$STEPS"} ${LOG_EVERY:+--log-every "$LOG_EVERY"} \
  ${DEVICE:+--device "$DEVICE"} ${POLICIES:+--policies $POLICIES} ${SEEDS:+--seeds $SEEDS} \
  > /dev/null || exit 2

scheduler=${SCHEDULER:-cuda} note=""
if [ "$scheduler" = cuda ] && ! problem=$(timeout 60 python3 -c "import dask_cuda" 2>&1); then
  scheduler=local note="dask-cuda does not import ($(tail -n 1 <<< "$problem"))"
fi

# run_campaign SCHEDULER: the campaign, its tasks stopping RESERVE_S before WALL_S. Sets
# status, command and command_wall_s; true where it wrote a new campaign.json.
run_campaign() {
  local left=$((wall_s - reserve_s - (SECONDS - began))) started=$SECONDS
  if [ "$left" -lt 60 ]; then
    echo "nve_dask_campaign: ${left} s left for the tasks, not started" >&2; return 1
  fi
  local run=(python3 -m mace_lpcalc.campaign "$campaign" --scheduler "$1" --workers 1
             --max-wall-s "$left")
  command="${run[*]}"
  # A campaign.json left by an earlier start must not pass for this one's.
  [ -e "$out/campaign.json" ] && mv "$out/campaign.json" "$out/campaign.previous.json"
  echo "nve_dask_campaign: $command" | tee -a "$out/console.log" >&2
  # The last resort if it hangs: timeout signals its whole process group (the Dask
  # workers too).
  timeout -k 10 $((wall_s + 25 - (SECONDS - began))) "${run[@]}" 2>&1 | tee -a "$out/console.log"
  status=${PIPESTATUS[0]} command_wall_s=$((SECONDS - started))
  [ -e "$out/campaign.json" ]
}

status=1 command="" command_wall_s=""
if ! run_campaign "$scheduler" && [ "$scheduler" = cuda ]; then
  # No record: the cluster did not start (or died); the runs resume on one local worker.
  note="--scheduler cuda ended with status $status before writing campaign.json (see console.log)"
  scheduler=local
  run_campaign local
fi

python3 -m mace_lpcalc.perf.dask_campaign report "$out/campaign.json" \
  --out "$out/dask_campaign_throughput.json" --scheduler "$scheduler" \
  --scheduler-note "$note" --command "$command" ${command_wall_s:+--command-wall-s "$command_wall_s"}

if [ -n "$copy" ]; then
  for file in campaign_nve_drift.toml campaign.json campaign.log console.log \
      dask_campaign_throughput.json nve_drift/comparison/certificate.json \
      nve_drift/comparison/summary.md nve_drift/comparison/thermo.png; do
    [ -e "$out/$file" ] && cp "$out/$file" "$copy/" || echo "not copied (missing): $file" >&2
  done
fi
echo "nve_dask_campaign: status $status after $((SECONDS - began)) s on --scheduler $scheduler" >&2
exit "$status"
