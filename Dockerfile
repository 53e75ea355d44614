# vittune in a container; the entrypoint is the `vittune` command.
#
# Build (CPU-only torch, the small image):
#   docker build -t vittune .
# Build with CUDA wheels: point pip at the PyTorch index of your CUDA version, e.g.
#   docker build -t vittune:cu128 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Pin torch if you need to (torchvision is resolved to the matching build):
#   docker build --build-arg TORCH_SPEC="torch==2.7.*" ...
#
# Run: mount your data and a folder for runs; give DataLoader workers enough shared memory.
#   docker run --rm --gpus all --shm-size 8g \
#     -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" -v vittune-cache:/cache \
#     -e WANDB_API_KEY vittune:cu128 finetune recipes/medical.yaml data.root=data/xray
#   docker run --rm vittune finetune recipes/quickstart.yaml trainer.max_epochs=1
#
# bookworm is pinned so the apt package name below stays right (Debian 13 renamed it).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.6,<3"
ARG TORCHVISION_SPEC="torchvision>=0.21"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITTUNE_CACHE=/cache/vittune \
    HF_HOME=/cache/huggingface

# OpenCV's wheels (used to decode 8/16-bit images) need GLib from the system.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /cache && chmod 1777 /cache

# torch and torchvision first, from the chosen index: `pip install .` then finds them
# satisfied and does not replace them with PyPI's default build.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" "$TORCHVISION_SPEC"

WORKDIR /opt/vittune
COPY pyproject.toml README.md ./
COPY vittune ./vittune
RUN pip install . \
    && python -c "import cv2, torch, timm, vittune.training.run" \
    && vittune --help > /dev/null

# Relative paths in recipes (data.root, logging.run_dir: runs) resolve from /work: mount
# data/ and runs/ there. The bundled recipes come along.
WORKDIR /work
COPY recipes ./recipes

ENTRYPOINT ["vittune"]
CMD ["--help"]
