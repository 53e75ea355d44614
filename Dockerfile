# vittune in a container; the entrypoint is the `vittune` command. docs/docker.md has more.
#
# Build (CPU-only torch, the small image):
#   docker build -t vittune .
# Build with CUDA wheels: point pip at the PyTorch index of your CUDA version, e.g.
#   docker build -t vittune:cu128 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Run as yourself, so files in the mounted runs/ are yours, not root's; give DataLoader
# workers enough shared memory:
#   docker run --rm --gpus all --shm-size 8g --user "$(id -u):$(id -g)" \
#     -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" -v vittune-cache:/cache \
#     -e WANDB_API_KEY vittune:cu128 finetune recipes/medical.yaml data.root=data/xray
#   docker run --rm vittune --version
#
# bookworm is pinned so the apt package name below stays right (Debian 13 renamed it).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Every extra: export (ONNX), stream (litdata, prepare-data), serve (LitServe), sweep (Optuna),
# medical (DICOM) and peft (LoRA/DoRA/IA3). A smaller image: --build-arg EXTRAS=export,stream
ARG EXTRAS=export,stream,sweep,serve,medical,peft

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITTUNE_CACHE=/cache/vittune \
    HF_HOME=/cache/huggingface \
    MPLCONFIGDIR=/cache/matplotlib \
    WANDB_CONFIG_DIR=/cache/wandb

# OpenCV's wheels (used to decode 8/16-bit images) need GLib from the system. The cache is
# writable by any user: `docker run --user` picks one that does not exist in the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /cache /work && chmod 1777 /cache /work \
    && useradd --create-home --uid 1000 vittune

WORKDIR /opt/vittune
COPY constraints.txt ./
# torch and torchvision first, from the chosen index, at the tested versions: the install
# below then finds them satisfied and does not replace them with PyPI's default build.
RUN pip install --index-url "$TORCH_INDEX_URL" -c constraints.txt torch torchvision

# The dependency layer: only pyproject.toml and the constraints decide it, so a change to the
# code reuses it (an empty stand-in package lets pip resolve the project's dependencies).
COPY pyproject.toml README.md ./
RUN mkdir vittune && touch vittune/__init__.py \
    && pip install -c constraints.txt ".[$EXTRAS]" \
    && pip uninstall -y vittune && rm -rf vittune build *.egg-info

# The code layer: vittune itself, its dependencies already there.
COPY vittune ./vittune
RUN pip install --no-deps . \
    && python -c "import cv2, onnx, litdata, torch, timm, vittune.training.run" \
    && vittune --version

# Relative paths in recipes (data.root, logging.run_dir: runs) resolve from /work: mount
# data/ and runs/ there. The bundled recipes come along.
WORKDIR /work
COPY --chown=vittune:vittune recipes ./recipes
USER vittune

# `vittune serve RUN --host 0.0.0.0` inside the container (docs/serve.md): publish with -p 8000:8000
EXPOSE 8000
ENTRYPOINT ["vittune"]
CMD ["--help"]
