# markerless service image. CPU by default; for CUDA build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends libglib2.0-0 libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" .
COPY configs ./configs

RUN useradd --uid 1000 --create-home markerless && mkdir /store && chown markerless /store
USER markerless
VOLUME ["/store"]

# Liveness = the worker watchdog (markerless_worker_alive on the metrics endpoint), the same signal that makes
# the service withhold its `running` heartbeat and publish `stalled`.
ENV MARKERLESS__METRICS__PORT=9108
EXPOSE 9108 8443
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
  CMD ["markerless", "health", "--config", "/app/configs/markerless.yaml"]

ENTRYPOINT ["markerless"]
CMD ["serve", "--config", "/app/configs/markerless.yaml"]
