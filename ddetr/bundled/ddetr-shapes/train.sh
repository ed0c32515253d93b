#!/usr/bin/env bash
# Reproduces ddetr/bundled/ddetr-shapes from scratch: the six training phases of the model card, in order, then the
# held-out evaluation. Run from the repository root:  bash ddetr/bundled/ddetr-shapes/train.sh [RUNS_DIR]
# An interrupted phase is resumed where it stopped (python -m finetune --resume); finished phases are skipped.
set -euo pipefail

runs="${1:-runs/ddetr-shapes}"
data="shapes:train=2000,validation=200,test=300,size=256"
common=(--image-size 256 --batch-size 4 --log-every 20)

phase() {  # phase NAME THREADS ARGS...: train into $runs/NAME unless its model is already there
  local name="$1" threads="$2"
  shift 2
  local out="$runs/$name"
  if [[ -f "$out/model/model.safetensors" ]]; then
    echo "== $name: already trained ($out/model)"
  elif [[ -f "$out/train_config.json" ]]; then
    echo "== $name: resuming"
    python -m finetune --resume --output-dir "$out" --threads "$threads"
  else
    echo "== $name"
    python -m finetune "${common[@]}" --threads "$threads" --output-dir "$out" "$@"
  fi
}

# 1: from scratch, 3000 steps, paper augmentation (multi-scale resize and crops)
phase phase1 1 --dataset "$data" --model small --max-steps 3000 --lr 2e-4 --lr-backbone 2e-4 --lr-drop 0.8 \
  --eval-every 2 --save-every 200 --seed 0
# 2 and 3: continue at half the learning rate
phase phase2 1 --dataset "$data" --model "$runs/phase1/model" --max-steps 1200 --lr 1e-4 --lr-backbone 1e-4 \
  --lr-drop 0.7 --eval-every 0 --save-every 300 --seed 1
phase phase3 1 --dataset "$data" --model "$runs/phase2/model" --max-steps 1300 --lr 1e-4 --lr-backbone 1e-4 \
  --lr-drop 0.6 --eval-every 0 --save-every 300 --seed 2
# 4: twice the training images, flips only (the images are already at the model's resolution), 11000 steps
phase phase4 2 --dataset "shapes:train=4000,validation=200,test=300,size=256" --model "$runs/phase3/model" \
  --max-steps 11000 --lr 1e-4 --lr-backbone 1e-4 --lr-drop 0.8 --augment flip --eval-every 2 --save-every 500 \
  --seed 4
# 5: phase 4's recipe again, 6000 steps
phase phase5 2 --dataset "shapes:train=4000,validation=200,test=300,size=256" --model "$runs/phase4/model" \
  --max-steps 6000 --lr 1e-4 --lr-backbone 1e-4 --lr-drop 0.75 --augment flip --eval-every 2 --save-every 500 \
  --seed 5

# 6: four times the training images, an exponential moving average of the weights (evaluated and exported), 12000 steps
phase phase6 2 --dataset "shapes:train=8000,validation=200,test=300,size=256" --model "$runs/phase5/model" \
  --max-steps 12000 --lr 1e-4 --lr-backbone 1e-4 --lr-drop 0.75 --augment flip --ema --ema-decay 0.9995 \
  --eval-every 1 --save-every 500 --seed 6

python -m finetune.evaluate --model "$runs/phase6/model" --dataset "$data" --split test
