#!/usr/bin/env bash
# The certificate campaign on one GPU: NPT water (thesis Experiment 2 settings) and NVE
# drift for every precision policy, REPLICAS seeds of each batched into one model call
# per step (python -m mace_lpcalc.protocols.npt ... --replicas N), then the comparison
# against FP64 (certificate.json, summary.md, plots).
#
#   bash bench/npt_campaign.sh OUT_DIR [NPT_STEPS] [REPLICAS] [NVE_STEPS]
#
# Run it again with larger step counts to extend the campaign: every run resumes from its
# checkpoint (written every 1000 steps and every minute), so it can be built up over
# several short GPU allocations. WALL_S=N makes the whole script end within about N
# seconds (each run stops in time with a checkpoint; runs with under a minute left are
# not started), for a job slot of known length. PARALLEL=1 runs the policies at once, as
# separate processes sharing the GPU: while one process runs its integrators in Python,
# the GPU computes for another (each gets an equal share of the CPU threads).
# ENSEMBLES="nve npt" runs the NVE drift runs first. POLICY_STEPS="POLICY=N ..." stops
# those policies at N steps (e.g. one already decided), leaving the GPU to the others.
# COMPARE=0 skips the comparison (e.g. where pymbar is missing); POLICIES, STRUCTURE, MODEL
# and DEVICE override the defaults.
# Where the machine does not outlive the slot: STATE_IN=DIR first restores the runs a
# previous slot packed there (python -m mace_lpcalc.campaign.state), STATE_OUT=DIR packs
# them at the end into parts of 15 MiB (at most STATE_MAX_PARTS, default 4: 60 MiB),
# ready to come back and be carried to the next slot; LOG_EVERY_NPT (default 250 steps)
# thins the NPT frames so that they fit (648 atoms: ~8 KB a frame).
set -euo pipefail
out=${1:?usage: bench/npt_campaign.sh OUT_DIR [NPT_STEPS] [REPLICAS] [NVE_STEPS]}
npt_steps=${2:-20000}
replicas=${3:-16}
nve_steps=${4:-5000}
model=${MODEL:-systems/water_mace.model}
structure=${STRUCTURE:-systems/water_648_spcfw.xyz}
device=${DEVICE:-cuda}
policies=${POLICIES:-fp64 fp32 tf32 fp32-linear-bf16 fp32-linear-fp16}
deadline=$((SECONDS + ${WALL_S:-315360000}))
mkdir -p "$out/npt" "$out/nve"
if [ -n "${STATE_IN:-}" ] && [ -e "$STATE_IN/state.json" ]; then
  python3 -m mace_lpcalc.campaign.state unpack "$STATE_IN" "$out"
fi

# Frames every 0.25 ps in NPT (density, RDF, MSD); every 0.05 ps in the shorter NVE runs,
# whose drift is a fit to the conserved energy.
declare -A log_every=([npt]=${LOG_EVERY_NPT:-250} [nve]=50)

# run PROTOCOL SETTINGS STEPS OUT_STEM POLICY: fresh, or resumed where a checkpoint exists.
run() {
  local protocol=$1 settings=$2 steps=$3 stem=$4 policy=$5 continue=(--overwrite)
  local left_s=$((deadline - SECONDS))
  if [ "$left_s" -lt 60 ]; then echo "$stem: not started, ${left_s} s left" >&2; return 0; fi
  # One replica writes STEM.h5, several STEM_seed<k>.h5.
  [ -e "${stem}_seed0.checkpoint.npz" ] || [ -e "$stem.checkpoint.npz" ] && continue=(--resume)
  python3 -m mace_lpcalc.protocols."$protocol" "$structure" --settings "$settings" \
    --model "$model" --policy "$policy" --device "$device" --steps "$steps" --seed 0 \
    --replicas "$replicas" --log-every "${log_every[$protocol]}" --checkpoint-every 1000 --checkpoint-every-s 60 \
    --max-wall-s "$((left_s - 20))" --out "$stem.h5" "${continue[@]}" >> "$stem.log" 2>&1 \
    || { echo "$stem: failed, see $stem.log" >&2; tail -3 "$stem.log" >&2; return 1; }
}

declare -A policy_steps=()
for cap in ${POLICY_STEPS:-}; do policy_steps[${cap%%=*}]=${cap#*=}; done

# every PROTOCOL SETTINGS STEPS: run it for each policy, one after the other or at once.
every() {
  local protocol=$1 settings=$2 all_steps=$3 pids=() policy failed=0 steps
  for policy in $policies; do
    steps=${policy_steps[$policy]:-$all_steps}
    [ "$steps" -le "$all_steps" ] || steps=$all_steps
    if [ "${PARALLEL:-0}" = 1 ]; then
      run "$protocol" "$settings" "$steps" "$out/$protocol/${protocol}_$policy" "$policy" &
      pids+=($!)
    else  # inside `every ... ||`, set -e is off: count the failure here
      run "$protocol" "$settings" "$steps" "$out/$protocol/${protocol}_$policy" "$policy" \
        || failed=1
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  echo "$(date -u +%T) $protocol: up to $all_steps steps x $replicas replicas" >&2
  return $failed
}

if [ "${PARALLEL:-0}" = 1 ]; then
  n_policies=$(wc -w <<< "$policies")
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + n_policies - 1) / n_policies ))}
fi
# A failed ensemble does not keep the other from running; the status says it failed.
status=0
for ensemble in ${ENSEMBLES:-npt nve}; do
  case $ensemble in
    npt) every npt protocols/npt_water.toml "$npt_steps" || status=1 ;;
    nve) every nve protocols/nve_drift.toml "$nve_steps" || status=1 ;;
    *) echo "unknown ensemble $ensemble (npt, nve)" >&2; exit 2 ;;
  esac
done
if [ -n "${STATE_OUT:-}" ]; then
  python3 -m mace_lpcalc.campaign.state pack "$out" "$STATE_OUT" \
    --max-parts "${STATE_MAX_PARTS:-4}" || status=1
fi
if [ "${COMPARE:-1}" = 1 ]; then
  python3 -m mace_lpcalc.compare "$out"/npt/npt_*_seed*.h5 --out-dir "$out/npt/comparison"
  python3 -m mace_lpcalc.compare "$out"/nve/nve_*_seed*.h5 --out-dir "$out/nve/comparison"
fi
exit $status
