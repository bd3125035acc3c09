# meshd as a static binary (musl) on distroless: the control plane image,
# and the image the gateway's bootstrap init container runs.
#   docker build -t meshd:latest .
# Injected sidecars run `meshd iptables` in their init container, which needs
# iptables and a shell:
#   docker build --target init -t meshd-init:latest .
# (pass it to `meshd inject --meshd-image meshd-init:latest`).

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin meshd \
    && cp target/x86_64-unknown-linux-musl/release/meshd /meshd

FROM debian:bookworm-slim AS init
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /meshd /usr/local/bin/meshd
ENTRYPOINT ["meshd"]

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /meshd /usr/local/bin/meshd
USER 65532:65532
EXPOSE 15010 15012 15014 15017
ENTRYPOINT ["/usr/local/bin/meshd"]
