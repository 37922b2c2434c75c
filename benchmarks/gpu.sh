#!/usr/bin/env bash
# GPU figures beside the CPU ones: run on a CUDA machine from the repository root (needs torch with
# CUDA, pydantic, scikit-learn, matplotlib, scipy; not dvc or mlflow). Writes $1 (default
# reports/benchmarks_gpu.json): per-family throughput through the trainer vs a bare loop, torch.compile
# on and off for the cnn, and the cnn's time to 0.91 test accuracy.
set -euo pipefail
out=${1:-reports/benchmarks_gpu.json}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" DEEPZOO_DEVICE=${DEEPZOO_DEVICE:-cuda}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
[ -f data/processed/fashion_mnist/train.pt ] || python3 -m deepzoo prepare fashion_mnist
[ -f data/processed/tunes/train.pt ] || python3 -m deepzoo prepare tunes
python3 benchmarks/run.py --parts throughput time_to_target startup --output "$out" --batches 300 --rounds 2 --compile cnn \
  --families cnn mlp lstm rnn autoencoder vae gan
