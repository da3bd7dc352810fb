# cpmgr: the checkpoint sidecar. Build from the repository root:
#   docker build -t cpmgr:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
# Run it with a config mounted at /etc/cpmgr/cpmgr.yaml and the socket directory shared with
# the consumers (see deploy/kubernetes/ and docs/operations.md).

# Both stages use the base pinned by digest, so a rebuild gets the same image:
#   python:3.11-slim-bookworm (Python 3.11.16), its OCI index digest (every architecture).
# Bump the tag and the digest together, in both FROM lines.

# ---- build: install the package and its runtime dependencies into a self-contained venv
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The dependencies first, in their own layer: pinned with hashes (requirements.lock, which
# also pins the build backend), so a code change reuses this layer and a rebuild is the same.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
# Then the code: the wheel reads README.md as its long description. No dependency is fetched
# here (--no-deps), nor an unpinned build backend (--no-build-isolation).
COPY pyproject.toml README.md ./
COPY cpmgr ./cpmgr
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# ---- runtime: the venv on a clean slim image, running as an unprivileged user
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="cpmgr" \
      org.opencontainers.image.description="Consumer-group checkpoint sidecar for Alibaba Cloud Log Service" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm" \
      org.opencontainers.image.documentation="docs/operations.md in the source repository"

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
