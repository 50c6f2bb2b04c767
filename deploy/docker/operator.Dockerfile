# syntax=docker/dockerfile:1
# flotilla-operator. Build from the repository root:
#   docker build -f deploy/docker/operator.Dockerfile -t flotilla-operator:0.1.0 .
# The toolchain matches rust-toolchain.toml; protoc comes from the protoc-bin-vendored crate.

FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --bin flotilla-operator \
    && install -D target/release/flotilla-operator /out/flotilla-operator

# glibc, libgcc and CA certificates, no shell; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/flotilla-operator /usr/local/bin/flotilla-operator
USER 65532:65532
EXPOSE 7443 9090
ENTRYPOINT ["/usr/local/bin/flotilla-operator"]
CMD ["run"]
