# streamscore: a slim runtime image. Build: docker build -t streamscore .
# Run a server:  docker run -p 50051:50051 streamscore serve --kafka KAFKA:9092 --host 0.0.0.0
# Run a worker:  docker run streamscore worker --kafka KAFKA:9092
# Everything in one container (embedded broker): docker run streamscore demo --duration 60

FROM python:3.11-slim AS build
WORKDIR /src
# CPU-only torch keeps the image small; pyproject pins torch==2.13.0.
ENV PIP_NO_CACHE_DIR=1 PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY streamscore ./streamscore
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 streamscore
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STREAMSCORE_HOST=0.0.0.0 \
    STREAMSCORE_MODEL_REPOSITORY=/home/streamscore/models
USER streamscore
WORKDIR /home/streamscore
# Bake the demo model in so the container needs no training at start.
RUN streamscore train --log-format text
EXPOSE 50051
# `streamscore health` honours STREAMSCORE_TLS_CA / _CLIENT_CERT / _CLIENT_KEY /
# _SERVER_NAME, so the check keeps working when TLS or mutual TLS is turned on.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
    CMD streamscore health --target "127.0.0.1:${STREAMSCORE_PORT:-50051}" --timeout 3
ENTRYPOINT ["streamscore"]
CMD ["serve"]
