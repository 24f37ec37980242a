#!/usr/bin/env bash
# One check of lorakit on a CUDA GPU (H100/H200 class), under 8 minutes, ending in one table:
#
#   bash benchmarks/gpu_check.sh            # from the repository root, venv in .venv
#
#   1. the CUDA tests (tests/train/test_cuda.py: CPU-vs-GPU training, bf16 + checkpointing) and
#      the training tests that follow the model's device (loop, packing, lean ops, distributed);
#   2. training tokens/s and peak GPU memory, lorakit against Trainer + PEFT (bf16), on the
#      bundled model and on a randomly initialised 1B-shaped Llama (benchmarks/gpu_train.py);
#   3. the serving benchmark on the GPU (benchmarks/serve_throughput.py --device cuda).
#
# Each part has its own time limit; a part that fails or runs out of time is reported as such and
# the rest still run. Logs and JSON go to $OUT (default benchmarks/results/gpu_check/).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)'));" \
         "install a CUDA build of torch and run on a GPU machine" >&2
    exit 2
fi
"$PY" - <<'EOF' | tee "$OUT/device.txt"
import torch
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

declare -A STATUS SECONDS_TAKEN
part() {  # part NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    SECONDS_TAKEN[$name]=$((SECONDS - start))
    case $rc in
        0) STATUS[$name]=ok ;;
        124|137) STATUS[$name]="timed out" ;;
        *) STATUS[$name]="failed (exit $rc)" ;;
    esac
    echo "   ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s; log $OUT/$name.log"
    tail -n 3 "$OUT/$name.log"
}

part tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/train/test_cuda.py tests/train/test_loop.py tests/train/test_gradient_checkpointing.py \
    tests/train/test_packing.py tests/train/test_lean_ops.py
part train 240 "$PY" benchmarks/gpu_train.py --steps 20 --batch 16 --out "$OUT/gpu_train.json"
part serve 150 "$PY" benchmarks/serve_throughput.py --device cuda --dtype bf16 --no-pack \
    --requests 64 --requests-c1 8 --out "$OUT/serve_throughput.json"

echo
echo "lorakit GPU check: $(cat "$OUT/device.txt")"
printf '%-8s %-18s %6s\n' part status seconds
for name in tests train serve; do
    printf '%-8s %-18s %6s\n' "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]}"
done
echo
grep -E "passed|failed|skipped" "$OUT/tests.log" | tail -n 1
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
train = out / "gpu_train.json"
if train.exists():
    print(f"\n{'model':10s} {'system':10s} {'tok/s':>9s} {'peak GPU MB':>12s}")
    for model, r in json.loads(train.read_text()).items():
        for system in ("lorakit", "peer-bf16"):
            print(f"{model:10s} {system:10s} {r[system]['tokens_per_s']:9.0f} {r[system]['peak_gpu_mb']:12.0f}")
        print(f"{model:10s} {'ratio':10s} {r['speed_ratio']:8.2f}x {r['memory_ratio']:11.2f}x")
serve = out / "serve_throughput.json"
if serve.exists():
    print("\nserving (see docs/serving.md for the systems):")
    data = json.loads(serve.read_text())
    for key, value in data.items():
        if isinstance(value, (int, float, str)):
            print(f"  {key}: {value}")
        elif isinstance(value, dict) and "tokens_per_s" in value:
            print(f"  {key}: {value['tokens_per_s']:.0f} tok/s")
EOF
for name in tests train serve; do
    [ "${STATUS[$name]}" = ok ] || exit 1
done
