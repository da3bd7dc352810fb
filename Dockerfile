# cpmgr: the checkpoint sidecar. Build from the repository root:
#   docker build -t cpmgr:0.1.0 .
# Run it with a config mounted at /etc/cpmgr/cpmgr.yaml and the socket directory shared with
# the consumers (see deploy/kubernetes/sidecar.yaml and docs/operations.md).

# ---- build: install the package and its runtime dependencies into a self-contained venv
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the build needs: the wheel reads README.md as its long description.
COPY pyproject.toml README.md ./
COPY cpmgr ./cpmgr
RUN pip install --no-cache-dir .

# ---- runtime: the venv on a clean slim image, running as an unprivileged user
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="cpmgr" \
      org.opencontainers.image.description="Consumer-group checkpoint sidecar for Alibaba Cloud Log Service" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid/gid so Kubernetes runAsUser/fsGroup and host file ownership can name it.
RUN groupadd --system --gid 10001 cpmgr \
    && useradd --system --uid 10001 --gid cpmgr --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin cpmgr \
    && install -d -o cpmgr -g cpmgr -m 0750 /run/cpmgr /var/lib/cpmgr \
    && install -d -m 0755 /etc/cpmgr

COPY --from=build /opt/venv /opt/venv
COPY config/cpmgr.example.yaml /etc/cpmgr/cpmgr.example.yaml

# Unbuffered so log lines reach the container runtime as they are written; no bytecode writes
# because the root filesystem is read-only in the recommended deployments.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CPMGR_SOCKET=/run/cpmgr/cpmgr.sock

USER 10001:10001
WORKDIR /var/lib/cpmgr

# The socket directory is shared with the consumers; a volume keeps it off the image layer.
VOLUME ["/run/cpmgr"]
# /metrics /healthz /readyz /status, once http.listen is set to a non-loopback address.
EXPOSE 9464

# SIGTERM drains: stop accepting, flush within commit.shutdown_timeout, then exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cpmgr"]
CMD ["run", "--config", "/etc/cpmgr/cpmgr.yaml"]
