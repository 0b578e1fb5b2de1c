# consensus_raft (Python) image: a drop-in for citacloud/consensus_raft in a
# CITA-Cloud node. Same contract as the Rust image: `consensus` and
# `grpc-health-probe` (also `grpc_health_probe`) on PATH and in /usr/bin,
# user chain (uid 1000), gRPC on 50001, run by Kubernetes as
#   consensus run -c /etc/cita-cloud/config/config.toml --stdout
# in working dir /data (raft data lands in /data/raft-data-dir).
#
#   docker build --build-arg GIT_HASH="$(git rev-parse --short HEAD)" \
#     -t citacloud/consensus_raft:py-latest .
#
# The build steps are those of nix/package.nix's preBuild: generate the
# protobuf code from protos/, stamp the git hash into _version.py, then
# install the package, with dependency versions pinned by requirements.txt.

FROM python:3.11-slim-bookworm AS build

WORKDIR /src
COPY requirements.txt pyproject.toml README.md consensus.py ./
COPY protos/ protos/
COPY raft/ raft/
COPY scripts/ scripts/
COPY cita_raft_tools/ cita_raft_tools/

# The build context has no .git: the hash comes in as a build argument.
ARG GIT_HASH=unknown
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# Code generation tools live in a throw-away venv (/opt/build), never in the
# image; the service gets a venv of its own (/opt/consensus).
RUN python -m venv /opt/build \
    && python -m venv /opt/consensus \
    && /opt/build/bin/pip install -c requirements.txt grpcio-tools \
    && /opt/build/bin/python scripts/genproto.py protos cita_raft_pb \
    && printf 'GIT_HASH = "%s"\n' "$GIT_HASH" > _version.py \
    && /opt/consensus/bin/pip install -c requirements.txt . \
    && /opt/consensus/bin/consensus -V \
    && /opt/consensus/bin/consensus git

FROM python:3.11-slim-bookworm

ARG GIT_HASH=unknown
LABEL org.opencontainers.image.title="consensus_raft" \
      org.opencontainers.image.description="Raft consensus service for CITA-Cloud, in Python" \
      org.opencontainers.image.source="https://github.com/cita-cloud/consensus_raft" \
      org.opencontainers.image.revision="${GIT_HASH}" \
      org.opencontainers.image.licenses="Apache-2.0"

# uid/gid 1000 as the Rust image and the node's pod securityContext expect.
RUN useradd --create-home --uid 1000 --user-group chain \
    && mkdir /data \
    && chown chain:chain /data

COPY --from=build /opt/consensus /opt/consensus
# The Rust image has its binaries in /usr/bin; keep absolute paths working.
RUN ln -s /opt/consensus/bin/consensus /usr/bin/consensus \
    && ln -s /opt/consensus/bin/grpc-health-probe /usr/bin/grpc-health-probe \
    && ln -s /opt/consensus/bin/grpc_health_probe /usr/bin/grpc_health_probe

ENV PATH=/opt/consensus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Numeric, so runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:1000
WORKDIR /data
EXPOSE 50001
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s \
    CMD ["grpc-health-probe", "-addr=localhost:50001"]
# As the Rust image: without a subcommand `consensus` prints its help; the
# node's StatefulSet always sets the command.
CMD ["consensus"]
