# Multi-stage build: compile in the Rust image, run from a small Debian base.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka is built with OpenSSL (security.protocol=SSL / SASL_SSL).
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY schema ./schema
COPY tests/fixtures ./tests/fixtures
COPY benches ./benches
RUN cargo build --release --locked --bin trusst-cdc

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 trusst \
    && mkdir -p /var/lib/trusst-cdc && chown trusst /var/lib/trusst-cdc
COPY --from=build /src/target/release/trusst-cdc /usr/local/bin/trusst-cdc
COPY connector-config /etc/trusst-cdc
USER trusst
WORKDIR /var/lib/trusst-cdc
ENTRYPOINT ["trusst-cdc"]
