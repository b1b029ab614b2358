# syntax=docker/dockerfile:1
# failoverd container image (docs/operations.md, "Install with docker compose").
#
#   docker build -t failoverd:local .
#   docker run --rm failoverd:local --help
#
# The image is the `failoverd` CLI; with no arguments it runs the daemon with
# /etc/failoverd/failoverd.toml (mount your config/ there). Other commands work too:
#   docker run --rm -v "$PWD/config:/etc/failoverd:ro" failoverd:local topics check --config ...

# ---- builder: wheels of failoverd and every dependency ------------------------------------
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon/ daemon/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime ------------------------------------------------------------------------------
FROM python:3.11-slim
RUN groupadd --system --gid 10001 failoverd \
    && useradd --system --uid 10001 --gid failoverd --home-dir /var/lib/failoverd \
       --shell /usr/sbin/nologin failoverd \
    && install -d -o failoverd -g failoverd -m 0750 /var/lib/failoverd \
    && install -d -m 0755 /etc/failoverd
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
    && rm -rf /wheels
COPY config/ /etc/failoverd/

# State store and bundle registry on the volume; the admin API reachable from outside the
# container (mutating calls still need the token); Prometheus metrics on 9464.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FAILOVERD_STATE__DIRECTORY=/var/lib/failoverd/state \
    FAILOVERD_REGISTRY__PATH=/var/lib/failoverd/registry \
    FAILOVERD_ADMIN__BIND=0.0.0.0:8080

USER 10001:10001
WORKDIR /var/lib/failoverd
VOLUME ["/var/lib/failoverd"]
EXPOSE 8080 9464

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["failoverd"]
CMD ["--log-format", "json", "run", "--config", "/etc/failoverd/failoverd.toml"]
