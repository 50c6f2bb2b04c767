# syntax=docker/dockerfile:1
# flotilla-agent, and flotilla-worker beside it: the agent runs the job's workers as its own child
# processes, so this image is also the workers' runtime. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t flotilla-agent:0.1.0 .
# NVML (libnvidia-ml.so.1) and CUDA are not in the image: the NVIDIA container runtime injects the
# node driver's own copies (see deploy/agent/daemonset.yaml).

FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --bin flotilla-agent --bin flotilla-worker \
    && install -D target/release/flotilla-agent /out/flotilla-agent \
    && install -D target/release/flotilla-worker /out/flotilla-worker

# debian-slim rather than distroless: custom-command TrainingJobs run their command in this
# container, and the DaemonSet's init container uses chown.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 flotilla \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin flotilla
COPY --from=build /out/flotilla-agent /out/flotilla-worker /usr/local/bin/
USER 65532:65532
EXPOSE 9400
# The agent stops cleanly on SIGINT (Ctrl-C); make that the container's stop signal.
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/flotilla-agent"]
CMD ["run"]
