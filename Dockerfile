# streamscore: a slim runtime image. Build: docker build -t streamscore .
# Run a server:  docker run -p 50051:50051 streamscore serve --kafka KAFKA:9092 --host 0.0.0.0
# Run a worker:  docker run streamscore worker --kafka KAFKA:9092
# Everything in one container (embedded broker): docker run streamscore demo --duration 60
#
# Configuration is by environment (every setting is STREAMSCORE_<NAME>; the full list
# with defaults: `docker run streamscore config`, README "Configuration"). The ones a
# deployment sets: STREAMSCORE_KAFKA (bootstrap, required by serve and worker),
# STREAMSCORE_PORT (gRPC, 50051), STREAMSCORE_METRICS_PORT (Prometheus, 0 = off;
# STREAMSCORE_METRICS_HOST: its address, a private interface, else STREAMSCORE_HOST),
# STREAMSCORE_ADMIN_TOKEN (a secret: enables the Admin API), STREAMSCORE_TLS_CERT_FILE /
# _TLS_KEY_FILE / _TLS_CLIENT_CA_FILE (TLS, mutual TLS), STREAMSCORE_TRITON_URL,
# STREAMSCORE_BUDGET_MS, STREAMSCORE_DRAIN_DELAY_S / _DRAIN_TIMEOUT_S (SIGTERM drain:
# set the orchestrator's grace period above their sum), STREAMSCORE_LOG_FORMAT,
# STREAMSCORE_CARD_HASH_KEY (a secret: the same on every server whose card hashes in logs
# and decisions must match), and for a secured Kafka cluster (README "A secured Kafka
# cluster") STREAMSCORE_KAFKA_SECURITY_PROTOCOL with STREAMSCORE_KAFKA_SASL_* and
# STREAMSCORE_KAFKA_SSL_*.
# With TLS on, the HEALTHCHECK below is a TLS client too and needs its own variables,
# or the container stays unhealthy while it serves: STREAMSCORE_TLS_CA (the CA that
# signed the server certificate: always), STREAMSCORE_TLS_CLIENT_CERT /
# _TLS_CLIENT_KEY (mutual TLS: a client certificate signed by the client CA), and
# STREAMSCORE_TLS_SERVER_NAME (when the certificate names a DNS name, not 127.0.0.1:
# the check connects to 127.0.0.1). `streamscore health` prints why a check failed.
# Lint: .venv/bin/hadolint Dockerfile (run by .ci/run).

FROM python:3.11-slim AS build
# gcc builds the compiled parts (streamscore/kernels/_windows.c, _dense.c, server/_wire.c); the
# runtime stage copies the built venv and carries no compiler.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# CPU-only torch keeps the image small; pyproject pins torch==2.13.0.
ENV PIP_NO_CACHE_DIR=1 PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml setup.py README.md ./
COPY streamscore ./streamscore
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --user-group streamscore
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STREAMSCORE_HOST=0.0.0.0 \
    STREAMSCORE_MODEL_REPOSITORY=/home/streamscore/models
USER 10001:10001
WORKDIR /home/streamscore
# Bake the demo model in so the container needs no training at start.
RUN streamscore train --log-format text
EXPOSE 50051
# `streamscore health --container` checks what the container runs: a serve (or demo)
# on its --port or STREAMSCORE_PORT; a worker, which serves no gRPC, is healthy while
# it runs. With TLS on it needs STREAMSCORE_TLS_CA (and, for mutual TLS,
# _TLS_CLIENT_CERT / _TLS_CLIENT_KEY; for a DNS-name certificate, _TLS_SERVER_NAME):
# see the header. A server is NOT_SERVING until its features have caught up with the
# log: on a production log (7 days) that can take minutes, longer than the start period
# below; raise it (`docker run --health-start-period`, or the orchestrator's probe) to
# suit, or a probe that restarts unhealthy containers will restart it mid catch-up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
    CMD ["streamscore", "health", "--container", "--timeout", "3"]
ENTRYPOINT ["streamscore"]
CMD ["serve"]
