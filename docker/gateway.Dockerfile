# fairdiff gateway: FastAPI + uvicorn, no torch (the image stays small and starts in a second).
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t fairdiff-gateway .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements/gateway.txt requirements/gateway.txt
RUN pip install -r requirements/gateway.txt

COPY pyproject.toml README.md ./
COPY common common
COPY service service
COPY workers workers
COPY adaptors adaptors
COPY testbed testbed
# --no-deps: the project's dependency list names torch; the gateway never imports it.
RUN pip install --no-deps . \
    && python -c "import service.app, sys; assert 'torch' not in sys.modules, 'gateway imported torch'"

RUN useradd --create-home --uid 10001 fairdiff && mkdir -p /data && chown fairdiff /data
USER fairdiff
ENV FAIRDIFF_DATA_DIR=/data
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"

CMD ["uvicorn", "service.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
