# fairdiff worker: Celery + diffusers on a CUDA build of torch. One container per GPU;
# the queue is chosen by the command (`fairdiff worker --queue inference|training`).
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t fairdiff-worker .
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# torch first, from the CUDA index, so nothing later pulls a CPU build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY requirements/worker.txt requirements/worker.txt
RUN pip install -r requirements/worker.txt

COPY pyproject.toml README.md ./
COPY common common
COPY service service
COPY workers workers
COPY adaptors adaptors
COPY testbed testbed
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 fairdiff && mkdir -p /data /models && chown fairdiff /data /models
USER fairdiff
ENV FAIRDIFF_DATA_DIR=/data \
    FAIRDIFF_DEVICE=auto

# Healthy = this container's worker heartbeat is fresh in Redis (model loaded, consuming its queue).
# docker-compose.yml overrides it per service with the right --queue.
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=3 \
    CMD fairdiff healthcheck --queue inference

CMD ["fairdiff", "worker", "--queue", "inference"]
