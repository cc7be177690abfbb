#!/usr/bin/env bash
# The GPU benchmark in one run (about 4-5 minutes on one H100/H200-class GPU): at 512 px (300 iterations) and
# 1024 px (100), the project at its default precision and at bf16-mixed (and with torch's L-BFGS, where that
# option exists), the plain tutorial loop and the floor: seconds per iteration, seconds for 300, the whole
# command's wall time, the final loss against 32-true. One table; docs/benchmarks.md (GPU) says what each row is.
#
#   benchmarks/gpu.sh [WEIGHTS]                  # on the GPU, from the repository root
#   benchmarks/gpu.sh --quick [WEIGHTS]          # (or --device cpu) the CPU at 32 and 48 px, 3 and 2 iterations:
#                                                # the script's own check, no figures
#   benchmarks/gpu.sh --compile-check [WEIGHTS]  # also: does model.compile give the eager gradient under bf16?
#
# WEIGHTS (or $NST_WEIGHTS): the trained VGG-16; default weights/vgg16_imagenet_keras.pth (a git-ignored copy in
# the checkout, for a machine that has only the checkout) or else ../shared/weights/vgg16_imagenet_keras.pth.
# $PYTHON: the interpreter (default .venv/bin/python where there is one, else python3).
set -euo pipefail

# The option that selects torch's own L-BFGS, as KEY=VALUE (e.g. model.lbfgs_impl=torch), once the project has
# one: it adds a "project torch L-BFGS" row (about 1.5 min more on the GPU). Empty: no such row.
TORCH_LBFGS_SET="${TORCH_LBFGS_SET:-}"

cd "$(dirname "$0")/.."
REPO="$PWD"
DEVICE=cuda SIZES=(512 1024) STEPS=(300 100) EXTRA=()
WEIGHTS="${NST_WEIGHTS:-}"
while (($#)); do
  case "$1" in
    --quick | --device=cpu) DEVICE=cpu SIZES=(32 48) STEPS=(3 2) EXTRA+=(--floor-repeats 2) ;;
    --device) [[ "${2:-}" == cpu ]] || { echo "gpu.sh: --device takes cpu (the GPU is the default)" >&2; exit 2; }
      DEVICE=cpu SIZES=(32 48) STEPS=(3 2) EXTRA+=(--floor-repeats 2); shift ;;
    --compile-check) EXTRA+=(--compile-check) ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu.sh: unknown option $1 (--quick, --device cpu, --compile-check, or a weights file)" >&2; exit 2 ;;
    *) WEIGHTS="$1" ;;
  esac
  shift
done
if [[ -z "$WEIGHTS" ]]; then
  for candidate in weights/vgg16_imagenet_keras.pth ../shared/weights/vgg16_imagenet_keras.pth; do
    if [[ -f "$candidate" ]]; then WEIGHTS="$candidate"; break; fi
  done
fi
if [[ -z "$WEIGHTS" || ! -f "$WEIGHTS" ]]; then
  echo "gpu.sh: no weights file (${WEIGHTS:-none found}): give its path, or copy it to weights/" >&2
  exit 2
fi
WEIGHTS="$(cd "$(dirname "$WEIGHTS")" && pwd)/$(basename "$WEIGHTS")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE  # this checkout's package
if [[ "$DEVICE" == cuda ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: torch sees no CUDA device here: run it on a GPU, or use --quick for the CPU check" >&2
  exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/nst-gpu-bench.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
CONTENT="$REPO/nst_lightning/samples/content_tubingen.jpg"
STYLE="$REPO/nst_lightning/samples/style_starry_night.jpg"
ONE_SHOT_DEVICE=$([[ "$DEVICE" == cuda ]] && echo gpu || echo cpu)
started=$SECONDS

# The whole command, as a user runs it: process start to exit, weights, targets and the written image included.
rows=("project default|" "project bf16-mixed|trainer.precision=bf16-mixed")
if [[ -n "$TORCH_LBFGS_SET" ]]; then rows+=("project torch L-BFGS|$TORCH_LBFGS_SET"); fi
for i in "${!SIZES[@]}"; do
  size=${SIZES[$i]} steps=${STEPS[$i]}
  finish=$(( (50 * steps + 150) / 300 ))  # the float32 finish scaled with the iterations (50 of 300)
  for entry in "${rows[@]}"; do
    name=${entry%%|*} setting=${entry#*|}
    args=("$CONTENT" "$STYLE" -o "$WORK/out.png" --overwrite --size "$size" --steps "$steps" --weights "$WEIGHTS"
          --backbone vgg16 --device "$ONE_SHOT_DEVICE" --set "model.float32_final_steps=$finish")
    if [[ -n "$setting" ]]; then args+=(--set "$setting"); fi
    echo "[$size px] whole command: $name ($steps iterations) ..."
    t0=$EPOCHREALTIME
    if ! (cd "$WORK" && "$PYTHON" -m nst_lightning "${args[@]}" >"$WORK/command.log" 2>&1); then
      tail -n 20 "$WORK/command.log" >&2
      echo "gpu.sh: the command failed: $PYTHON -m nst_lightning ${args[*]}" >&2
      exit 1
    fi
    wall=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$size" "$name" "$wall" "$steps" >>"$WORK/walls.tsv"
  done
done

"$PYTHON" benchmarks/gpu.py --device "$DEVICE" --weights "$WEIGHTS" --backbone vgg16 --sizes "${SIZES[@]}" \
  --steps "${STEPS[@]}" --walls "$WORK/walls.tsv" --torch-lbfgs "$TORCH_LBFGS_SET" "${EXTRA[@]}"
echo "(gpu.sh wall time $((SECONDS - started)) s)"
