#!/usr/bin/env bash
# Methods compared on the CPU, from the same tiny random Qwen2.5-VL: DAPO and VGPO (by default) on the
# synthetic counting task, 3 seeds each, every final checkpoint evaluated (validation set and its
# blank-image control) and its visual attention analysed; one table (OUT/comparison.md) and one figure
# (OUT/comparison.png). Rerunning resumes (finished runs are kept).
#   bash examples/compare_cpu.sh                                     # DAPO vs VGPO, seeds 0 1 2
#   METHODS="dapo vgpo entropy vppo papo" SEEDS=0 bash examples/compare_cpu.sh
#   TASK=multicount OUT=outputs/compare_forgetting bash examples/compare_cpu.sh
# Environment: OUT [outputs/compare]  METHODS [dapo vgpo]  SEEDS [0 1 2]  TASK [counting]  JOBS [2]
# (trainings at once; each gets cpus / JOBS threads). Extra arguments are config overrides for every run.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a methods <<< "${METHODS:-dapo vgpo}"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
exec python tools/compare_methods.py --out "${OUT:-outputs/compare}" --methods "${methods[@]}" \
    --seeds "${seeds[@]}" --task "${TASK:-counting}" --jobs "${JOBS:-2}" "$@"
