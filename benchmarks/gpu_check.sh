#!/usr/bin/env bash
# One prepared GPU check on one H100/H200, capped at BUDGET_S (480 s) after the installs:
#   - throughput.py for vit_tiny / vit_small / vit_base at 224 px, bf16-mixed, without and with
#     torch.compile: fit vs bare images/s, step time, peak memory, MFU vs the bf16 dense peak,
#     and a torch.profiler summary (top kernels, GPU busy share) of both paths for ViT-B and -Ti;
#   - the progress bar's cost: ViT-Ti with the bar refreshed every step, every 10 (the default)
#     and off;
#   - the 224 px data pipeline (pathmnist preset) with 8 and 16 workers, next to the model rates,
#     with augmentation in the workers and on the GPU (batched, after the transfer).
# Results go to $OUT (default /tmp/gpu_check_out): one JSON per run (throughput_*.json,
# pipeline.json), throughput.md, env.txt (GPU, versions, what had to be installed) and logs/.
# Order: pipeline, ViT-B (the MFU goal) without/with compile, the progress-bar runs, ViT-S, ViT-Ti.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu           # the same flow on CPU with a tiny config
#   bash benchmarks/gpu_check.sh --fetch-wheels  # where PyPI is reachable: fill .whl/ to carry
#
# The GPU image lacks monai, albumentations, medmnist, jsonargparse (and maybe their deps):
# --fetch-wheels downloads them for CPython ${WHEEL_PY:-3.12} into .whl/ (git-ignored, ~58 MB),
# which the device call carries; this script installs the ones that do not import into
# /tmp/site with --no-index --no-deps and puts /tmp/site and src/ on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu | --tiny) MODE=cpu ;;
  --fetch-wheels) MODE=fetch ;;
  *) echo "usage: $0 [--cpu | --fetch-wheels]" >&2; exit 2 ;;
esac

# import name -> pinned distribution (the versions the CPU machines test with).
WHEELS=(
  "monai=monai==1.6.1"
  "albumentations=albumentations==2.0.8"
  "albucore=albucore==0.0.24"
  "simsimd=simsimd==6.5.16"
  "stringzilla=stringzilla==5.3.2"
  "cv2=opencv-python-headless==4.11.0.86"  # the GPU image has it: carry it only if it lacks it
  "pydantic=pydantic==2.14.4"
  "pydantic_core=pydantic_core==2.50.5"
  "annotated_types=annotated_types==0.8.0"
  "typing_inspection=typing_inspection==0.4.5"
  "medmnist=medmnist==3.0.2"
  "fire=fire==0.7.1"
  "termcolor=termcolor==3.3.0"
  "jsonargparse=jsonargparse==4.53.0"
  "docstring_parser=docstring_parser==0.18.0"
  "typeshed_client=typeshed_client==2.15.0"
)

if [ "$MODE" = fetch ]; then
  specs=()
  for w in "${WHEELS[@]}"; do specs+=("${w#*=}"); done
  python3 -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PY:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
  du -sh .whl
  exit 0
fi

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT/logs"
if [ "$MODE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE WANDB_MODE=offline WANDB_SILENT=true NO_ALBUMENTATIONS_UPDATE=1

missing=()
for w in "${WHEELS[@]}"; do
  mod="${w%%=*}"
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" \
    || missing+=("$mod")
done
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  mode: $MODE"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
  echo "python: $("$PY" -V 2>&1)  missing before install: ${missing[*]:-none}"
} | tee "$OUT/env.txt"
if [ "${#missing[@]}" -gt 0 ]; then
  ls .whl/*.whl >/dev/null 2>&1 \
    || { echo "missing ${missing[*]} and no .whl/: run --fetch-wheels and carry .whl" >&2; exit 1; }
  files=()
  for mod in "${missing[@]}"; do
    for w in "${WHEELS[@]}"; do
      [ "${w%%=*}" = "$mod" ] || continue
      dist="${w#*=}"; dist="${dist%%==*}"
      files+=(.whl/"${dist//-/_}"-*.whl)
    done
  done
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "${files[@]}"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import torch, lightning, timm, monai, albumentations, medmnist, jsonargparse, cv2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'lightning', lightning.__version__, 'timm', timm.__version__)" \
  | tee -a "$OUT/env.txt"

if [ "$MODE" = gpu ]; then
  # Most important first: ViT-B/16 is the MFU goal; the budget may cut the tail.
  # name | model | batch | extra throughput.py flags
  RUNS=(
    "vit_base_compile-no|vit_base|256|--profile-steps 5"
    "vit_base_compile-yes|vit_base|256|--compile --profile-steps 5"
    "vit_tiny_compile-no|vit_tiny|512|--profile-steps 5"
    "vit_tiny_compile-no_bar-1|vit_tiny|512|--progress-bar-refresh 1"
    "vit_tiny_compile-no_bar-off|vit_tiny|512|--progress-bar false"
    "vit_small_compile-no|vit_small|256|"
    "vit_small_compile-yes|vit_small|256|--compile"
    "vit_tiny_compile-yes|vit_tiny|512|--compile"
  )
  RUN=(--img-size 224 --patch-size 16 --precision bf16-mixed --steps 30 --warmup 10 --repeats 3
       --threads 8 --accelerator gpu)
  PIPE=(--flag pathmnist --size 224 --batch-size 256 --num-workers 8 16 --batches 20 --n-train 6144
        --augment-on workers device --device cuda --pin-memory)
  LIMIT=150
else
  RUNS=(
    "test_vit_compile-no|test_vit|8|--profile-steps 2"
    "test_vit_compile-no_bar-1|test_vit|8|--progress-bar-refresh 1"
    "test_vit_compile-no_bar-off|test_vit|8|--progress-bar false"
  )
  # The fused AdamW that CUDA gets by default, so that the CPU run takes the GPU's optimizer path.
  RUN=(--img-size 32 --patch-size 16 --precision bf16-mixed --steps 2 --warmup 1 --repeats 1
       --threads 1 --accelerator cpu --fused-optimizer true)
  PIPE=(--flag pathmnist --size 28 --batch-size 8 --num-workers 0 2 --batches 3 --n-train 64
        --augment-on workers device)
  LIMIT=600
fi
# The whole check stays within BUDGET_S (default 480 s) after the installs: each run is capped
# by what is left, and a run that cannot get 30 s is skipped.
DEADLINE=$((SECONDS + ${BUDGET_S:-480}))
capped() {  # capped NAME CMD...: run CMD with a timeout of min(LIMIT, time left); log to logs/
  local name="$1" left; shift
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then echo "SKIP $name (budget spent)"; return 0; fi
  [ "$left" -gt "$LIMIT" ] && left="$LIMIT"
  if timeout "$left" "$@" >"$OUT/logs/$name.log" 2>&1; then
    echo "ok   $name ($((SECONDS - start))s)"
  else
    echo "FAIL $name (exit $?): $(tail -n 3 "$OUT/logs/$name.log" | tr '\n' ' ')"
  fi
}

start=$SECONDS
if [ -z "${SKIP_PIPELINE:-}" ]; then  # SKIP_PIPELINE=1: the throughput runs only
  capped pipeline "$PY" benchmarks/pipeline.py "${PIPE[@]}" --threads 2 --out "$OUT/pipeline.json"
fi
: > "$OUT/throughput.md"
for entry in "${RUNS[@]}"; do
  IFS='|' read -r name model batch extra <<<"$entry"
  read -r -a flags <<<"$extra"
  start=$SECONDS
  capped "throughput_$name" "$PY" benchmarks/throughput.py --model "$model" --batch-size "$batch" \
    "${RUN[@]}" "${flags[@]}" --out "$OUT/throughput_$name.json" --markdown "$OUT/throughput.md"
done
# The profiles (top kernels, GPU busy share) of the runs that have one.
for f in "$OUT"/logs/throughput_*.log; do
  grep -q '^profile ' "$f" && { echo "### $(basename "$f" .log)"; sed -n '/^profile /,$p' "$f"; }
done > "$OUT/profiles.txt" || true

echo
echo "## Throughput ($MODE)"
"$PY" benchmarks/throughput.py --print-header
cat "$OUT/throughput.md"
echo
echo "## Pipeline ($MODE)"
grep -s '^|' "$OUT/logs/pipeline.log" || true
echo
echo "## Profiles ($MODE)"
cat "$OUT/profiles.txt"
