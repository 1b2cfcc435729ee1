#!/usr/bin/env bash
# NPT water (thesis Experiment 2 settings) per precision policy and seed, all runs at once
# on one GPU, then the seed-averaged comparison against FP64.
#
#   bash bench/npt_campaign.sh OUT_DIR [STEPS] [MODEL] [STRUCTURE]
#
# Every run's settings, model hash, policy and versions are stored in its .h5 file.
set -euo pipefail
out=${1:?usage: bench/npt_campaign.sh OUT_DIR [STEPS] [MODEL] [STRUCTURE]}
steps=${2:-20000}
model=${3:-systems/water_mace.model}
structure=${4:-systems/water_648.xyz}
policies=${POLICIES:-fp64 fp32 fp32-linear-bf16 fp32-linear-fp16}
seeds=${SEEDS:-0 1 2}
mkdir -p "$out"
for policy in $policies; do
  for seed in $seeds; do
    python3 -m mace_lpcalc.protocols.npt "$structure" --settings protocols/npt_water.toml \
      --model "$model" --policy "$policy" --device cuda --steps "$steps" --seed "$seed" \
      --log-every 50 --checkpoint-every 5000 --out "$out/npt_${policy}_seed${seed}.h5" \
      --overwrite > "$out/npt_${policy}_seed${seed}.log" 2>&1 &
  done
done
wait
python3 -m mace_lpcalc.compare "$out"/npt_*.h5 --out-dir "$out/comparison" \
  --static-deviations --model "$model" --device cuda
