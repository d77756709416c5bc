#!/usr/bin/env bash
# CPU quickstart: a tiny random Qwen2.5-VL, the synthetic counting task, VGPO training with vLLM
# rollouts, TensorBoard logs in outputs/runs/cpu_tiny, a final accuracy table.
#   bash examples/quickstart_cpu.sh [key.sub=value ...]      (overrides go to the trainer)
# Under torchrun (e.g. TP 2 x PP 2):
#   torchrun --nproc-per-node 4 -m megatron_vgpo.train --config examples/configs/cpu_tiny.yaml \
#       parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2
set -euo pipefail
cd "$(dirname "$0")/.."
# The files go where examples/configs/cpu_tiny.yaml names them when OUT is the default (outputs/), so
# the tools that read that config (tools/bench_methods.py) run on them; another OUT is passed on
# below. tests/examples/test_quickstart.py keeps the two in step.
OUT=${OUT:-outputs}
# Weights of std 0.1 (the tool's default is 0.02, like the real models' initializer_range): in a random
# model at 0.02 the 4 image tokens of a 109-token prompt hardly move the hidden state where the answer
# is written, and RL does not find the image within the default run; at 0.1 it does (see README).
[ -f "$OUT/tiny-qwen25vl/config.json" ] || python tools/make_tiny_qwen25vl.py --output "$OUT/tiny-qwen25vl" --seed 0 --init-std 0.1
# One object per image token (28-pixel cells in a 56x56 image: 4 tokens): the tiny random model can
# learn to read that on 2 cores in minutes; 14-pixel objects (the tool's default) take it far longer.
DATA="$OUT/synthetic_quickstart"
[ -f "$DATA/train.parquet" ] || python tools/make_synthetic_dataset.py --output "$DATA" --train 2048 --val 128 \
    --seed 0 --cell 28 --max-distractors 1
exec python -m megatron_vgpo.train --config examples/configs/cpu_tiny.yaml \
    model.hf_path="$OUT/tiny-qwen25vl" \
    "data.train_files=[$DATA/train.parquet]" \
    "data.val_files=[$DATA/val.parquet, $DATA/val_blank.parquet]" \
    logging.tensorboard_dir="$OUT/runs" checkpoint.save_dir="$OUT/checkpoints/cpu_tiny" "$@"
