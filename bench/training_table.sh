#!/usr/bin/env bash
# The thesis's Table 4.6 with our data: the shipped model's architecture and seed trained
# under every training policy (all at once on one GPU), then a short NVT run of each
# trained model as a stability check, then the table.
#
#   bash bench/training_table.sh OUT_DIR [EPOCHS] [DEVICE]
set -euo pipefail
out=${1:?usage: bench/training_table.sh OUT_DIR [EPOCHS] [DEVICE]}
epochs=${2:-16}
device=${3:-cuda}
data=systems/water_reference
policies=${POLICIES:-fp64 fp32 amp-bf16 amp-fp16 linear-bf16 linear-fp16}
mkdir -p "$out"
for policy in $policies; do
  ( python3 -m mace_lpcalc.train --train $data/train.xyz.gz --valid $data/valid.xyz.gz \
      --test $data/test.xyz.gz --out "$out/$policy" --policy "$policy" --seed 0 \
      --device "$device" --epochs "$epochs" --hidden-irreps 32x0e --max-ell 2 \
      --correlation 2 --radial-mlp 32 32 32 --r-max 5.0 \
      --energy-weight 1000 --forces-weight 100 --stress-weight 1000 \
    && python3 -m mace_lpcalc.protocols.nvt systems/water_192.xyz \
      --model "$out/$policy/best.model" --device "$device" --steps 2000 --log-every 20 \
      --out "$out/$policy/nvt.h5" --overwrite ) > "$out/$policy.log" 2>&1 &
done
wait
python3 -m mace_lpcalc.training.table "$out"/*/metrics.json --out "$out/training_table.json"
