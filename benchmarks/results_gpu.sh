#!/usr/bin/env bash
# The GPU rows of docs/RESULTS.md: every CIFAR-10 (JPEG) run, concurrently on one GPU, inside a
# fixed time budget. Run from the repository root:
#
#   DATA=/path/to/cifar10-jpeg (folder or .tar.gz) OUT=/tmp/out BUDGET=480 bash benchmarks/results_gpu.sh
#
# Jobs (each a plain `python launch.py …` run directory under $RUNS):
#   a        cifar10_jpeg_cpu (ImageNet stem, L=4, λ from data): QCFS from scratch, v(0) calibration,
#            fine-tuned at T=2 with the recipe's settings (BN frozen, mean loss)
#   a_t1/2/4 the ANN of a, fine-tuned at T=1/2/4 with BN statistics over time-folded batches,
#            learnable θ and the TET loss
#   relu     the same network with ReLU (a reference, and the start of b)
#   b        the ReLU network turned into QCFS (λ from data), a fifth of relu's epochs, then converted
#   c        resnet18_cifar10 (the paper's CIFAR stem, AutoAugment, Cutout, bf16), a short schedule
# Jobs still running at the budget's end are stopped; every run's report.json holds the stages it
# completed. $OUT/runs.tar.gz gets the reports, logs and plots (no weights) every 20 s. EXTRA holds
# overrides added to every job (a smoke test: EXTRA="data.train_subset=512 data.eval_subset=500").
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:?set DATA to the CIFAR-10 JPEG folder or .tar.gz}
OUT=${OUT:-/tmp/qcfs_results_gpu}
RUNS=${RUNS:-/tmp/qcfs_results_gpu_runs}
BUDGET=${BUDGET:-480}
PY=${PYTHON:-python3}
EPOCHS_A=${EPOCHS_A:-20} EPOCHS_RELU=${EPOCHS_RELU:-25} EPOCHS_C=${EPOCHS_C:-20} FT_EPOCHS=${FT_EPOCHS:-5}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 QCFS_SNNTORCH_TRACEBACK=1
mkdir -p "$OUT" "$RUNS"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$OUT/driver.log"; }

job() {  # job NAME ARGS…: one run directory, stopped 20 s before the budget ends
    local name=$1
    shift
    say "start $name: $*"
    timeout --signal=INT --kill-after=10 $(($(left) - 20)) "$PY" launch.py run_dir="$RUNS/$name" "$@" ${EXTRA:-} >"$RUNS/$name.out" 2>&1
    say "end $name rc=$?"
}

snapshot() {
    tar czf "$OUT/runs.part.tar.gz" -C "$RUNS" --exclude='*.safetensors' --exclude=checkpoints --exclude='*.nir' . 2>/dev/null \
        && mv "$OUT/runs.part.tar.gz" "$OUT/runs.tar.gz"
}

wait_for() {  # wait_for FILE: until it exists or the budget is nearly spent
    while [ ! -f "$1" ] && [ "$(left)" -gt 60 ]; do sleep 5; done
    [ -f "$1" ]
}

COMMON="data.name=imagefolder data.root=$DATA"
STRONG="finetune.epochs=$FT_EPOCHS finetune.bn=train finetune.learn_threshold=true finetune.loss=tet"

job a recipe=cifar10_jpeg_cpu $COMMON data.num_workers=4 train.epochs=$EPOCHS_A \
    snn.calibrate=[channel] finetune.epochs=$FT_EPOCHS &
job relu recipe=cifar10_jpeg_cpu $COMMON data.num_workers=4 model.activations=[] stages=[train] \
    train.epochs=$EPOCHS_RELU &
job c recipe=resnet18_cifar10 $COMMON data.num_workers=5 train.epochs=$EPOCHS_C finetune.epochs=$FT_EPOCHS \
    snn.timesteps=[1,2,4,8,16,32] &
(
    wait_for "$RUNS/a/ann.safetensors" || exit 0
    for t in 1 2 4; do
        job "a_t$t" recipe=cifar10_jpeg_cpu $COMMON data.num_workers=3 stages=[convert,finetune] \
            model.checkpoint="$RUNS/a/ann.safetensors" model.threshold_init=fixed finetune.timesteps=$t $STRONG &
    done
    wait
) &
(
    wait_for "$RUNS/relu/ann.safetensors" || exit 0
    job b recipe=cifar10_jpeg_cpu $COMMON data.num_workers=4 model.checkpoint="$RUNS/relu/ann.safetensors" \
        model.threshold_init=data train.epochs=$((EPOCHS_RELU / 5)) train.lr=0.02 train.warmup_epochs=0 \
        snn.calibrate=[channel] $STRONG
) &

while [ -n "$(jobs -r)" ] && [ "$(left)" -gt 5 ]; do
    snapshot
    sleep 20
done
wait
snapshot
say "done"
"$PY" - "$RUNS" <<'EOF' | tee -a "$OUT/driver.log"
import json, sys
from pathlib import Path

for report in sorted(Path(sys.argv[1]).glob("*/report.json")):
    r = json.loads(report.read_text())
    line = [report.parent.name, r.get("status"), "stages " + " ".join(f"{k}={v['seconds']:.0f}s" for k, v in r["stages"].items())]
    if r.get("ann", {}).get("top1") is not None:
        line.append(f"ANN {100 * r['ann']['top1']:.2f}")
    if "snn" in r:
        line.append("SNN " + " ".join(f"T{t}={100 * a:.2f}" for t, a in zip(r["snn"]["timesteps"], r["snn"]["top1"])))
    if "calibration" in r:
        c = r["calibration"]
        line.append("calibrated " + " ".join(f"T{t}={100 * a:.2f}" for t, a in zip(c["timesteps"], c["top1"])))
    if "finetune" in r:
        f = r["finetune"]
        line.append(f"finetune T={f['timesteps']}: {100 * f['top1_before']:.2f} -> {100 * f['top1_after']:.2f}; all T "
                    + " ".join(f"T{t}={100 * a:.2f}" for t, a in zip(f["snn_after"]["timesteps"], f["snn_after"]["top1"])))
    print(" | ".join(line))
EOF
