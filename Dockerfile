#
# bertserve images. Two runtime targets, one command (`python -m service`), no torch and no training code:
#
#   docker build -t bertserve:gpu .                  # default target: CUDA 13 + cuDNN 9 + onnxruntime-gpu
#   docker build --target cpu -t bertserve:cpu .     # python:3.11-slim + CPU-only onnxruntime, ~10x smaller
#
# Where no registry is reachable, pass a base built from Debian packages (scripts/stand-in-base.sh) with
# `--build-arg PYTHON_IMAGE=...` (and CUDA_IMAGE for the gpu target); README "Deploy" has the exact commands.
# No `# syntax=` line: it makes BuildKit pull a frontend image, which fails where no registry answers.
#
# Stage order matters for Docker's legacy builder (the only one without buildx): it builds every stage that
# precedes --target, so the cpu stages come first and `--target cpu` never touches the CUDA base.
#
# Configured from the environment only (twelve-factor): the image sets BERTSERVE_MODEL_DIR, _HOST and _PORT and
# passes no flags (a flag would win over the environment), so `-e BERTSERVE_PORT=9000` moves the HTTP server,
# the gRPC port (HTTP + 1 unless BERTSERVE_GRPC_PORT is set) and the HEALTHCHECK together.
#
# The model bundle is mounted read-only at /models (`-v $PWD/models/bbc:/models:ro`), or baked in with
# `--build-arg MODEL_BUNDLE=models/bbc` (a directory inside the build context).
#
# Why the NVIDIA CUDA+cuDNN runtime base image rather than onnxruntime-gpu's `cuda`/`cudnn` pip extras:
#  - The NVIDIA image carries NVIDIA_REQUIRE_CUDA=cuda>=13.x. The NVIDIA container toolkit checks it against the
#    host driver when the container starts and refuses to start with a clear error on a too-old driver. With
#    pip-installed CUDA libraries the container starts and onnxruntime quietly falls back to the CPU provider:
#    exactly the silent failure this service works to detect.
#  - It also sets NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES=compute,utility, puts CUDA and cuDNN on the
#    default library path (no LD_LIBRARY_PATH or preload_dlls games), and ships one CUDA/cuDNN pair that NVIDIA
#    built and tested together. The pip extras resolve nvidia-*-cu13 wheels independently of each other at
#    build time.
#  - The base layers are shared by every CUDA image on a GPU node, so they are pulled once per node; the pip
#    wheels (~2-3 GB) would be a private, unshared layer in every image version.
# The CUDA major must match onnxruntime-gpu's build: >= 1.27 is built for CUDA 13 / cuDNN 9 (1.26 was the last
# for CUDA 12). tests/deploy checks this tag against the pin in pyproject.toml. Ubuntu 24.04 brings Python 3.12.

ARG CUDA_IMAGE=nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# A directory in the build context copied to /models; the default holds only a README (mount a bundle instead).
ARG MODEL_BUNDLE=deploy/docker/no-model

# ---------------------------------------------------------------------------------------------------------------
# cpu-builder: a virtual environment with the service and the CPU-only onnxruntime wheel.
FROM ${PYTHON_IMAGE} AS cpu-builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer: a code change does not reinstall onnxruntime.
COPY pyproject.toml README.md deploy/docker/requirements.py requirements/service.lock ./
RUN python requirements.py --flavor cpu pyproject.toml > requirements.txt \
 && pip install --no-cache-dir -c service.lock -r requirements.txt
# Only service/ is copied: training/ (and torch) never reach the image.
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import pkgutil, importlib, service, onnxruntime; [importlib.import_module(m.name) for m in pkgutil.walk_packages(service.__path__, 'service.')]; print('onnxruntime', onnxruntime.__version__)"

# ---------------------------------------------------------------------------------------------------------------
# cpu: small runtime image. Non-root (numeric uid, so Kubernetes' runAsNonRoot can verify it).
FROM ${PYTHON_IMAGE} AS cpu
ARG MODEL_BUNDLE
RUN groupadd --system --gid 10001 bertserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin bertserve
COPY --from=cpu-builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/bertserve/healthcheck.py
COPY ${MODEL_BUNDLE}/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    BERTSERVE_MODEL_DIR=/models \
    BERTSERVE_HOST=0.0.0.0 \
    BERTSERVE_PORT=8000 \
    BERTSERVE_PROVIDER=cpu
WORKDIR /opt/bertserve
USER 10001:10001
EXPOSE 8000 8001
# Liveness only: /readyz (model loaded and warm) is for load balancers and Kubernetes readiness.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/bertserve/healthcheck.py"]
# Exec form: python is PID 1 and receives SIGTERM itself (readiness 503, drain, exit 0).
ENTRYPOINT ["python", "-m", "service"]

# ---------------------------------------------------------------------------------------------------------------
# gpu-builder: the same venv with onnxruntime-gpu, built on the runtime base so that the interpreter the venv
# links to is byte-for-byte the one in the final image.
FROM ${CUDA_IMAGE} AS gpu-builder
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# DL3008 (pin apt versions) is ignored here and in the gpu stage: see the justification there.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md deploy/docker/requirements.py requirements/service.lock ./
RUN python requirements.py --flavor gpu pyproject.toml > requirements.txt \
 && pip install --no-cache-dir -c service.lock -r requirements.txt
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import pkgutil, importlib, service, onnxruntime; [importlib.import_module(m.name) for m in pkgutil.walk_packages(service.__path__, 'service.')]; print('onnxruntime', onnxruntime.__version__)"

# ---------------------------------------------------------------------------------------------------------------
# gpu (default target): CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu.
FROM ${CUDA_IMAGE} AS gpu
ARG MODEL_BUNDLE
# ARG, not ENV: only apt needs it, and it must not persist into the running container.
ARG DEBIAN_FRONTEND=noninteractive
# Version pins for apt packages would break the build every time Ubuntu's archive moves a patch release on;
# the base image tag pins the distribution release, which is what fixes python3's minor version (3.12).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 bertserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin bertserve
COPY --from=gpu-builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/bertserve/healthcheck.py
COPY ${MODEL_BUNDLE}/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    BERTSERVE_MODEL_DIR=/models \
    BERTSERVE_HOST=0.0.0.0 \
    BERTSERVE_PORT=8000
WORKDIR /opt/bertserve
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/bertserve/healthcheck.py"]
ENTRYPOINT ["python", "-m", "service"]
