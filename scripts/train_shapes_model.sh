#!/usr/bin/env bash
# Reproduce the bundled shapes-v1 model (ldm/weights/shapes-v1.safetensors) from scratch on a CPU.
# Stages: autoencoder and CLIP side by side (they are independent), the autoencoder's decoder on whole
# images, then the diffusion U-Net, then the evaluation written into runs/shapes-eval.json. See
# ldm/weights/MODEL_CARD.md for timings.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
# One thread per process: on 2 cores, two processes with two threads each run many times slower
# than one thread each (the thread pools spin against each other).
export OMP_NUM_THREADS=1

$python scripts/train_vae.py --config configs/shapes/autoencoder.yaml &
autoencoder=$!
$python scripts/train_clip.py --config configs/shapes/clip.yaml &
clip=$!
wait $autoencoder
wait $clip
# Alone on the machine now, the later stages take both cores.
# The autoencoder trained on 32 x 32 crops (4 x 4 latents) is cheap per step but decodes whole 8 x 8
# latent grids poorly (26.4 dB); 800 steps on whole images with the encoder frozen bring it to 32.2 dB.
# The latents and the scale factor stay as they were, as for SD's fine-tuned ft-MSE decoder. No
# discriminator (disc_start = max_steps).
OMP_NUM_THREADS=2 $python scripts/train_vae.py --config configs/shapes/autoencoder.yaml --set \
    train.output_dir=runs/shapes-decoder train.max_steps=800 loss.disc_start=800 \
    autoencoder_training.crop_size=0 autoencoder_training.train_decoder_only=true \
    autoencoder_training.init_from=runs/shapes-autoencoder/autoencoder.safetensors
OMP_NUM_THREADS=2 $python scripts/train_diffusion.py --config configs/shapes/diffusion.yaml
mkdir -p ldm/weights
# Stored in float16 (half the size: the text encoder's 49408-token embedding alone is 25 MB in float32);
# the pipeline computes in float32 on the CPU. The evaluation below measures this stored file.
$python scripts/convert_checkpoint.py runs/shapes-diffusion/model.safetensors ldm/weights/shapes-v1.safetensors \
    --dtype fp16 --force
OMP_NUM_THREADS=2 $python scripts/evaluate.py --ckpt ldm/weights/shapes-v1.safetensors --clip runs/shapes-clip/clip.safetensors \
    --out runs/shapes-eval.json
