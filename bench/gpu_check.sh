#!/usr/bin/env bash
# GPU check: what a GPU user runs, within 8 minutes on one GPU (GPU_CHECK_BUDGET_S, default 480).
#
# On a machine with a CUDA GPU:
#   1. builds the CPU and CUDA kernel libraries;
#   2. runs every CUDA test (pytest -m cuda tests): kernels bit for bit against the reference, an
#      inner step without host syncs, an outer optimiser resumed onto the GPU;
#   3. runs bench/kernels.py on the GPU: each kernel's effective GB/s against the device's copy
#      bandwidth measured the same way (written to bench/results/kernels_gpu.json);
#   4. runs two outer rounds of each algorithm with run.device=cuda (distrain simulate, 30 steps
#      of 15 inner steps, small evaluation, output in a temporary folder);
#   5. a SparseLoCo simulation of two replicas on CUDA that checkpoints, then resumes and goes on;
#   6. the embedded default on CUDA: a compressed pipeline replica beside two full ones;
#   7. an adaptive-SP replica of two devices: NCCL device groups under torchrun when the machine
#      has two GPUs, else the simulation's threads sharing the one GPU;
#   8. tokens/s of an inner step and the host syncs it makes (bench/train_throughput.py);
#   9. writes bench/results/gpu_check.json: every step's command, exit status, seconds and the
#      tail of its output, the GPU kernel figures, tokens/s and syncs, a verdict per part, "ok".
# Without a CUDA device it runs the CPU-side steps only (CPU build, CUDA compile when nvcc is
# present, collection of the CUDA tests), prints a "gpu_check: no CUDA device" line and exits 0
# when they pass. Exit status on a GPU machine: 0 when every step passed, 1 otherwise.
# GPU_CHECK_DRY_RUN=1 runs the GPU path on the CPU (device cpu, output in a temporary folder
# unless GPU_CHECK_OUT is set): it tests this script's plumbing, not the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=${GPU_CHECK_DRY_RUN:-0}
DEV=cuda
OUT=${GPU_CHECK_OUT:-bench/results/gpu_check.json}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
ALGORITHMS=${GPU_CHECK_ALGORITHMS:-"sparseloco diloco ddp"}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ "$DRY" = 1 ]; then
  DEV=cpu
  OUT=${GPU_CHECK_OUT:-$WORK/gpu_check_dry.json}
fi
START=$(date +%s)
STEPS="$WORK/steps.jsonl"
: > "$STEPS"
FAILED=0

record() {  # record NAME EXIT MILLISECONDS LOGFILE COMMAND...
  local name=$1 rc=$2 ms=$3 log=$4
  shift 4
  "$PY" - "$name" "$rc" "$ms" "$log" "$*" >> "$STEPS" <<'PYEOF'
import json, pathlib, sys
name, rc, ms, log, cmd = sys.argv[1:6]
p = pathlib.Path(log)
tail = p.read_text(errors="replace")[-2000:] if p.is_file() else ""
print(json.dumps({"step": name, "command": cmd, "exit": int(rc), "seconds": round(int(ms) / 1000, 1),
                  "tail": tail}))
PYEOF
}

step() {  # step NAME LIMIT_S COMMAND...: run one step under what is left of the budget
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((limit > left)); then limit=$left; fi
  if ((limit <= 0)); then
    echo "skipped: the ${BUDGET}s budget is spent" > "$WORK/$name.log"
    record "$name" 124 0 "$WORK/$name.log" "$@"
    echo "== $name: skipped (budget spent)"
    FAILED=1
    return 124
  fi
  echo "== $name: $*"
  local t0 rc
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  record "$name" "$rc" $((($(date +%s%N) - t0) / 1000000)) "$WORK/$name.log" "$@"
  tail -n 4 "$WORK/$name.log" | sed 's/^/   /'
  if ((rc != 0)); then
    echo "   -> exit $rc"
    FAILED=1
  fi
  return $rc
}

step build_cpu 180 "$PY" -m distrain.comm.kernels.build --cpu=yes --cuda=no
HAVE_NVCC=0
if "$PY" -c 'from distrain.comm.kernels import build; raise SystemExit(build.nvcc_compiler() is None)'; then
  HAVE_NVCC=1
  step build_cuda 240 "$PY" -m distrain.comm.kernels.build --cpu=no --cuda=yes --arch 80,90
fi

if [ "$DRY" != 1 ] && ! "$PY" -c 'import torch; raise SystemExit(not torch.cuda.is_available())' 2>/dev/null; then
  step collect_cuda_tests 120 "$PY" -m pytest --collect-only -q -m cuda tests
  n=$(grep -Eo '[0-9/]+ tests? collected( \([0-9]+ deselected\))?' "$WORK/collect_cuda_tests.log" | tail -1)
  if ((FAILED)); then
    echo "gpu_check: no CUDA device, and a CPU-side step failed (see above)"
    exit 1
  fi
  echo "gpu_check: no CUDA device: built the kernels (nvcc: $([ $HAVE_NVCC = 1 ] && echo yes || echo no)), collected the CUDA tests (${n:-?}); GPU steps skipped, $OUT not written"
  exit 0
fi

step cuda_tests 240 "$PY" -m pytest -q -m cuda tests
step bench_kernels 150 "$PY" bench/kernels.py --device "$DEV" --repeats 3 --allow-noisy \
  --out "$WORK/kernels_gpu.json"
if [ "$DRY" != 1 ] && [ -f "$WORK/kernels_gpu.json" ]; then
  cp "$WORK/kernels_gpu.json" bench/results/kernels_gpu.json
fi
DISTRAIN=${DISTRAIN:-$(command -v distrain || echo "$PY -m distrain.cli")}
for algo in $ALGORITHMS; do
  TOPO=()  # the default's replicas; ddp's gradient all-reduce needs replicas of one worker each
  if [ "$algo" = ddp ]; then TOPO=(--topology.replica='[{count=2}]'); fi
  step "simulate_$algo" 120 $DISTRAIN simulate --config default --run.device="$DEV" "${TOPO[@]}" \
    --train.steps=30 --outer.inner_steps=15 --outer.algorithm="$algo" \
    --topology.straggler_policy=wait --train.eval_every=30 --train.eval_batches=2 \
    --data.max_bytes=4000000 --logging.plots=false --logging.tensorboard=false \
    --logging.progress=false --run.out_dir="$WORK/runs/$algo"
done

COMMON="--logging.plots=false --logging.tensorboard=false --logging.progress=false --data.max_bytes=4000000"
step resume_save 120 $DISTRAIN simulate --config default --run.device="$DEV" --topology.replica='[{count=2}]' \
  --train.steps=30 --checkpoint.every=15 --train.eval_every=30 --train.eval_batches=2 $COMMON \
  --run.name=resume --run.out_dir="$WORK/runs/resume"
step resume_load 120 $DISTRAIN simulate --config default --run.device="$DEV" --topology.replica='[{count=2}]' \
  --train.steps=45 --checkpoint.every=15 --train.eval_every=45 --train.eval_batches=2 $COMMON \
  --run.name=resume --run.out_dir="$WORK/runs/resume" --checkpoint.resume=auto
grep -q "resumed from step 30" "$WORK/resume_load.log" || { echo "   -> the run did not resume"; FAILED=1; }
step pipeline 150 $DISTRAIN simulate --config default --run.device="$DEV" --train.steps=30 --train.eval_every=30 \
  --train.eval_batches=2 $COMMON --run.out_dir="$WORK/runs/pipeline"
SP="--data.sampler=documents --data.max_doc_len=256 --data.batch_tokens=2048 --train.steps=6 --outer.algorithm=none \
  --train.eval_every=6 --train.eval_batches=1 $COMMON --runtime.torch_threads=1"
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$DRY" != 1 ] && ((NGPU >= 2)); then
  step sp_nccl 180 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m distrain.launch.torchrun \
    --config default --topology.replica='[{devices=2, parallel="sp"}]' --runtime.device_backend=nccl $SP \
    --run.out_dir="$WORK/runs/sp"
else  # one GPU: the replica's two devices are threads sharing it (gloo device groups, CUDA tensors)
  step sp_threads 180 $DISTRAIN simulate --config default --run.device="$DEV" \
    --topology.replica='[{devices=2, parallel="sp"}]' $SP --run.out_dir="$WORK/runs/sp"
fi
PRESETS="test 20m"
if [ "$DRY" = 1 ]; then PRESETS=test; fi  # the 20m preset takes minutes per step on two CPU cores
step throughput 120 "$PY" bench/train_throughput.py --presets $PRESETS --steps 8 --out "$WORK/throughput.json"

"$PY" - "$STEPS" "$WORK" "$OUT" "$FAILED" "$(($(date +%s) - START))" "$BUDGET" <<'PYEOF'
import json, pathlib, sys
import torch
steps_file, work, out, failed, total, budget = sys.argv[1:7]
steps = [json.loads(line) for line in pathlib.Path(steps_file).read_text().splitlines() if line]
kern = pathlib.Path(work, "kernels_gpu.json")
bench = json.loads(kern.read_text()) if kern.is_file() else {}
gpu = bench.get("gpu") or bench.get("cpu")  # "cpu" only in a dry run
runs = {}
for m in pathlib.Path(work, "runs").glob("*/**/metrics.jsonl"):
    algo = m.relative_to(pathlib.Path(work, "runs")).parts[0]
    rows = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
    losses = [r for r in rows if any("loss" in k for k in r)]
    runs[algo] = {"rows": len(rows), "last": losses[-1] if losses else None}
tp = pathlib.Path(work, "throughput.json")
throughput = json.loads(tp.read_text()) if tp.is_file() else {}
parts = {"kernels": ["build_cpu", "build_cuda", "cuda_tests", "bench_kernels"],
         "outer algorithms on CUDA": [s["step"] for s in steps if s["step"].startswith("simulate_")],
         "checkpoint and resume on CUDA": ["resume_save", "resume_load"], "compressed pipeline on CUDA": ["pipeline"],
         "adaptive SP replica": ["sp_nccl", "sp_threads"], "tokens/s and host syncs": ["throughput"]}
by = {s["step"]: s for s in steps}
verdicts = {}
for part, names in parts.items():
    ran = [by[n] for n in names if n in by]
    verdicts[part] = "not run" if not ran else ("ok" if all(s["exit"] == 0 for s in ran) else "FAILED")
result = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
    "torch": torch.__version__,
    "ok": failed == "0" and all(s["exit"] == 0 for s in steps), "seconds": int(total),
    "budget_s": int(budget), "parts": verdicts, "kernels": gpu, "throughput": throughput.get("presets", throughput),
    "runs": runs, "steps": steps,
}
pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
pathlib.Path(out).write_text(json.dumps(result, indent=2) + "\n")
for part, verdict in verdicts.items():
    print(f"gpu_check: {part}: {verdict}")
print(f"gpu_check: {'ok' if result['ok'] else 'FAILED'} in {total}s on {result['device']}; wrote {out}")
PYEOF
exit $((FAILED != 0))
