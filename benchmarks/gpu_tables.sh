#!/usr/bin/env bash
# The GPU tables of docs/BENCHMARKS.md and the resnet18_cifar10 row of docs/RESULTS.md, in one run that
# fits about 10 minutes of one GPU (written for an H200). Run from the repository root:
#
#   cp ../shared/data/cifar10-jpeg.tar.gz runs/      # an ignored path: carry it to the GPU machine
#   OUT=/tmp/out DATA=runs/cifar10-jpeg.tar.gz BUDGET=570 bash benchmarks/gpu_tables.sh
#
# Parts, in this order (each one JSON line per measurement in $OUT/*.jsonl, a log in $OUT/driver.log):
#   0. resnet18_cifar10 (CIFAR stem, L = 4), EPOCHS epochs inside TRAIN_S seconds, first so that its schedule
#      completes: data.in_memory (crop, flip, Cutout on the GPU; no AutoAugment, which a short schedule does
#      not need), every stage of the recipe; its SNN gap table is printed next to the paper's
#   1. inference: ANN, engine, engine held to NCHW, snnTorch's step loop, SpikingJelly 2.0 (if installed),
#      resnet18 at 32×32 (batch 256) and 224×224 (batch 32), T = 1, 2, 4, 8, fp32 and bf16, peak memory
#   2. one fine-tuning step, the same engines, 32×32 batch 128 and 224×224 batch 16, T = 1, 2, 4, 8
#   3. the loader against the model: CIFAR-10 per image (4, 8, 15 workers) and in memory; ImageNet-sized
#      JPEGs (synthetic) with 4, 8, 15 workers against resnet34's bf16 training step (for the 8-GPU settings)
#   4. tests/test_cuda.py on the device
# A part still running when the budget is spent is stopped; what it wrote stays. $OUT/summary.txt has
# the tables. PYTHON names the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qcfs_gpu_tables}
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
BUDGET=${BUDGET:-570}
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-20}   # resnet18_cifar10's ANN epochs: the schedule must end inside TRAIN_S (about 6 s an epoch expected)
TRAIN_S=${TRAIN_S:-270}  # seconds for the whole resnet18_cifar10 run (train, convert, eval, calibrate, finetune)
export PYTHONUNBUFFERED=1 QCFS_SNNTORCH_TRACEBACK=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$OUT/driver.log"; }
part() {  # part NAME SECONDS COMMAND…: at most SECONDS (and never past the budget), stdout to $OUT/NAME.jsonl
    local name=$1 limit=$2
    shift 2
    local cap
    cap=$(left)
    [ "$limit" -lt "$cap" ] && cap=$limit
    if [ "$cap" -lt 10 ]; then say "skip $name: budget spent"; return; fi
    say "start $name (≤ ${cap}s): $*"
    timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$OUT/$name.jsonl" 2>>"$OUT/$name.err"
    say "end $name rc=$?"
}

say "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)" \
    | tee -a "$OUT/driver.log" || { say "no CUDA device: nothing measured"; exit 1; }
$PY -c "import spikingjelly.activation_based" 2>/dev/null || say "spikingjelly not installed: its column is left out"

RUN="$OUT/resnet18_cifar10"
rm -rf "$RUN"
part resnet18_cifar10 "$TRAIN_S" $PY launch.py recipe=resnet18_cifar10 data.name=imagefolder data.root="$DATA" \
    data.in_memory=true data.autoaugment=false model.threshold_init=data train.epochs=$EPOCHS finetune.epochs=2 \
    snn.timesteps=[1,2,4,8,16,32] run_dir="$RUN"
find "$RUN" -name '*.safetensors' -delete 2>/dev/null
rm -rf "$RUN/checkpoints"

B=benchmarks
for dtype in fp32 bf16; do
    part inference 60 $PY $B/snn_inference.py --device cuda --dtype $dtype --configs 32 --batch 256 --timesteps 1 2 4 8 --repeats 10
    part inference 60 $PY $B/snn_inference.py --device cuda --dtype $dtype --configs 224 --batch 32 --timesteps 1 2 4 8 --repeats 5
    part training 50 $PY $B/snn_training.py --device cuda --dtype $dtype --size 32 --batch 128 --timesteps 1 2 4 8 --repeats 5
    part training 50 $PY $B/snn_training.py --device cuda --dtype $dtype --size 224 --batch 16 --timesteps 1 2 4 8 --repeats 3
done
part loader 40 $PY $B/data_loader.py --device cuda --dtype bf16 --workers 4 8 15 --in-memory --batches 50 --step-repeats 20 \
    recipe=resnet18_cifar10 data.name=imagefolder data.root="$DATA" data.autoaugment=false
part loader 60 $PY $B/data_loader.py --device cuda --dtype bf16 --workers 4 8 15 --batches 30 --step-repeats 10 \
    --synthetic-imagenet 2000 recipe=resnet34_imagenet
part test_cuda 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py


$PY - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def lines(name):
    path = out / f"{name}.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")] if path.is_file() else []


print("inference (wall ms; ratio = ms / (T × NCHW ANN ms), ratio_cl to the channels-last ANN; speedup = peer / engine; peak MiB)")
for r in lines("inference"):
    ms, ratio, ratio_cl, speed = r["wall_ms"], r["wall_ratio"], r["wall_ratio_cl"], r.get("wall_speedup_vs", {})
    print(f"  {r['input']}px b{r['batch']} {r['dtype']} T={r['T']}: ann {ms['ann']:.2f} ann_cl {ms['ann_cl']:.2f} | "
          + " ".join(f"{k} {ms[k]:.2f} ({ratio[k]:.2f}/{ratio_cl[k]:.2f})" for k in ratio)
          + " | speedup " + " ".join(f"{k} {v:.2f}" for k, v in speed.items()) + f" | peak {r.get('peak_mb')}")
print("fine-tuning step (wall ms; ratio to T × ANN step; peak and saved MiB)")
for r in lines("training"):
    ms, ratio = r["wall_ms"], r["wall_ratio"]
    print(f"  {r['input']}px b{r['batch']} {r['dtype']} T={r['T']}: ann {ms['ann']:.1f} ann_cl {ms['ann_cl']:.1f} | "
          + " ".join(f"{k} {ms[k]:.1f} ({ratio[k]:.2f})" for k in ratio) + f" | peak {r['peak_mb']} | saved {r['saved_mb']}")
print("loader against the model (images/s)")
for r in lines("loader"):
    print(f"  {r['recipe']} {r['model']} {r['image_size']}px workers={r['workers']} in_memory={r['in_memory']}: "
          f"loader {r['loader_img_s']:.0f}, step {r['step_img_s']:.0f}, ratio {r['loader_over_step']}")
report = out / "resnet18_cifar10" / "report.json"
if report.is_file():
    r = json.loads(report.read_text())
    paper = {"ANN": 96.04, 2: 75.44, 4: 90.43, 8: 94.82, 16: 95.92, 32: 96.08}
    print(f"resnet18_cifar10 (CIFAR-10 JPEG, {r.get('status')}; stages " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in r["stages"].items()) + ")")
    if r.get("ann", {}).get("top1") is not None:
        print(f"  ANN top-1 {100 * r['ann']['top1']:.2f} (paper, 300 epochs: {paper['ANN']})")
    if "snn" in r:
        for t, a in zip(r["snn"]["timesteps"], r["snn"]["top1"]):
            gap = 100 * (r["ann"]["top1"] - a)
            print(f"  T={t}: SNN {100 * a:.2f}, gap {gap:.2f}; paper SNN {paper.get(t, '–')}, gap "
                  + (f"{paper['ANN'] - paper[t]:.2f}" if t in paper else "–"))
    if "finetune" in r:
        f = r["finetune"]
        print(f"  fine-tuned at T={f['timesteps']}: {100 * f['top1_before']:.2f} -> {100 * f['top1_after']:.2f}")
EOF
say "done"
