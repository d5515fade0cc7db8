# flare_async cells in a container: one image for the server, relays, sites and admins.
#
#   docker build -t flare-async .                                  # the core package only
#   docker build -t flare-async:demo --build-arg EXTRAS=demo \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # + torch (CPU)
#
# EXTRAS picks the package's extras (comma-separated: demo, torch, lightning, llm); every one
# of those brings torch, so give TORCH_INDEX_URL with them to get the CPU wheels (much smaller
# than the default CUDA ones). Startup kits are never baked in: mount each at run time,
# read-only, under /kits, and give the cell a writable /work (jobs, inbox, audit log); a kit
# is mode 0700, so run as its owner:
#
#   docker run --user "$(id -u):$(id -g)" --read-only --tmpfs /tmp \
#       -v "$PWD/kits/server:/kits/server:ro" -v "$PWD/work/server:/work" -p 18010:18010 \
#       flare-async run /kits/server --jobs /work/jobs
#
# See docs/deployment.md, "Docker and Kubernetes".

FROM python:3.11.10-slim-bookworm AS build
ARG EXTRAS=""
ARG TORCH_INDEX_URL=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flare_async ./flare_async
# A virtual environment, so that the runtime stage copies one folder and nothing of pip.
RUN python -m venv /opt/flare-async \
    && /opt/flare-async/bin/pip install --no-cache-dir \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11.10-slim-bookworm
# A fixed, unprivileged UID/GID (10001): Kubernetes manifests (`flare-async kube`) run as it
# and mount kits readable by its group.
RUN groupadd --system --gid 10001 flare \
    && useradd --system --uid 10001 --gid 10001 --home-dir /work --no-create-home \
        --shell /usr/sbin/nologin flare \
    && mkdir -p /kits /work \
    && chown 10001:10001 /work
COPY --from=build /opt/flare-async /opt/flare-async
ENV PATH="/opt/flare-async/bin:${PATH}" \
    HOME=/work \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /work
VOLUME ["/work"]
# The listen ports of cells/topologies/two-tier.toml and deploy/project.toml: the server's
# tls:// and wss://, a relay's tls:// and wss://. A kit may name others; publish what it says.
EXPOSE 18010 18011 18443 18444
# No HEALTHCHECK: a cell has no health endpoint, and a probe that opens its TLS port without a
# certificate of the project is a refused connection in its log every interval. A cell that
# cannot go on exits (status 1, one line on stderr), so the process itself is its health:
# let the orchestrator restart it (`restart: unless-stopped`, a Deployment's restartPolicy).
HEALTHCHECK NONE
ENTRYPOINT ["flare-async"]
CMD ["--help"]
