#!/usr/bin/env bash
# One call on a GPU machine: the ZeRO equivalence checks and the SAM throughput ratio on CUDA
# with NCCL, in fp32 and bf16; every figure lands in $OUT (default ./gpu_check_out).
#
#   benchmarks/gpu_check.sh                  # all GPUs of the machine, ~5-8 minutes on one H200
#   QUICK=1 benchmarks/gpu_check.sh          # fewer repetitions (~3 minutes)
#
# What runs (ranks = number of visible GPUs; one GPU gives world size 1, which still runs the
# ZeRO code paths, NCCL and the bf16 fp32-master restore, but cannot show sharding across ranks):
#   1. equivalence, fp32 (TF32 off): ZeRO 0-3 x {SAM, SAM-max, ASAM-max, SGD, accumulation,
#      Sharp MinMax} vs the single-process loop on the same GPU; tolerance 1e-5.
#   2. equivalence, bf16 weights with fp32 masters (ZeRO 1-3) vs the fp32 single-process loop:
#      tolerance 1e-2 (bf16 arithmetic; about 2e-3 measured with CPU bf16), and after every step the forward weights must equal
#      bf16(master) exactly (SAM's perturbation fully removed).
#   3. throughput: SAM/plain step-time ratio under ZeRO-2 (and 3) vs the single-process ratio,
#      fp32 and bf16 (target within 10 %).
# The project never depends on this script; CI runs the CPU/gloo versions (tests marked distributed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

if ! python -c "import torch, deepspeed; assert torch.cuda.is_available()" >>"$LOG" 2>&1; then
    say "needs torch with CUDA and deepspeed importable (see $LOG)"; exit 2
fi
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=4 NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
} > "$OUT/environment.txt" 2>&1
say "GPUs: $NGPU; $(tail -1 "$OUT/environment.txt")"

# the rendezvous store binds port 0 itself (no port picked here that another process could take)
TORCHRUN="python -m torch.distributed.run --nnodes 1 --max_restarts 0 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 --local-addr 127.0.0.1"
run() {  # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    say "start $name"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    say "end $name: exit $rc after $((SECONDS - start))s"
    echo "$name $rc $((SECONDS - start))" >> "$OUT/steps.txt"
    return 0
}
: > "$OUT/steps.txt"

EQ=tests/integration/test_deepspeed_equivalence.py
run equivalence_fp32 420 $TORCHRUN --nproc_per_node "$NGPU" "$EQ" "$OUT/equivalence_fp32.json" 0,1,2,3 --device cuda
run equivalence_bf16 420 $TORCHRUN --nproc_per_node "$NGPU" "$EQ" "$OUT/equivalence_bf16.json" 1,2,3 --device cuda --bf16

REPS=30; [ "${QUICK:-0}" = 1 ] && REPS=10
TP="python benchmarks/zero_sam_throughput.py --device cuda --nproc $NGPU --hidden 4096 4096 4096 --batch 256 --reps $REPS --json"
run throughput_zero2_fp32 300 bash -c "$TP --stage 2 > '$OUT/throughput_zero2_fp32.json'"
run throughput_zero2_bf16 300 bash -c "$TP --stage 2 --bf16 > '$OUT/throughput_zero2_bf16.json'"
run throughput_zero3_bf16 300 bash -c "$TP --stage 3 --bf16 > '$OUT/throughput_zero3_bf16.json'"

python - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
ok = True

def load(name):
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

for name, tol, need_exact_restore in (("equivalence_fp32.json", 1e-5, False), ("equivalence_bf16.json", 1e-2, True)):
    data = load(name)
    if data is None:
        print(f"{name}: MISSING (see gpu_check.log)"); ok = False; continue
    rows = data["rows"]
    worst = max(rows.items(), key=lambda kv: kv[1]["max_abs_diff"])
    gaps = max(r["restore_gap"] for r in rows.values())
    passed = worst[1]["max_abs_diff"] < tol and (gaps == 0.0 or not need_exact_restore)
    ok &= passed
    print(f"{name}: {len(rows)} cases on {data['device']} x{data['world']}, worst |diff| "
          f"{worst[1]['max_abs_diff']:.2e} ({worst[0]}), tolerance {tol:g}; max |w - bf16(master)| after steps "
          f"{gaps:.1e} -> {'PASS' if passed else 'FAIL'}")
for name in ("throughput_zero2_fp32.json", "throughput_zero2_bf16.json", "throughput_zero3_bf16.json"):
    data = load(name)
    if data is None:
        print(f"{name}: MISSING (see gpu_check.log)"); ok = False; continue
    passed = abs(data["relative_difference"]) <= data["target"]
    ok &= passed
    print(f"{name}: {data['params'] / 1e6:.1f}M params, ZeRO-{data['stage']} x{data['nproc']}, "
          f"single SAM/plain {data['single_ratio']:.3f} ({data['single_ms']['plain']:.1f} ms plain), "
          f"ZeRO {data['zero_ratio']:.3f} ({data['zero_ms']['plain']:.1f} ms plain), "
          f"difference {data['relative_difference']:+.1%} -> {'PASS' if passed else 'FAIL'}")
print("overall:", "PASS" if ok else "FAIL")
EOF
say "done; figures in $OUT"
