# Multi-stage image: build with the Rust toolchain, run on debian-slim as a non-root user.
#   docker build -t tether .
#   docker run -p 1883:1883 -v tether-data:/var/lib/tether tether
# Configuration: the packaged /etc/tether/tether.toml, a file mounted over it, or
# TETHER_<TABLE>__<KEY> environment variables (e.g. -e TETHER_SESSION__MAX_INFLIGHT=64).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --bin tether

FROM debian:bookworm-slim
# A fixed uid, so a volume can be prepared for it (chown 10001).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/tether \
        --shell /usr/sbin/nologin tether \
    && mkdir -p /var/lib/tether /etc/tether \
    && chown tether:tether /var/lib/tether
COPY --from=build /src/target/release/tether /usr/local/bin/tether
COPY packaging/tether.toml /etc/tether/tether.toml
USER tether
VOLUME /var/lib/tether
# MQTT, and the admin API once TETHER_ADMIN__BIND=0.0.0.0:8080 and a token are set.
EXPOSE 1883 8080
# tether is PID 1: it handles SIGTERM (docker stop) and SIGINT itself; SIGHUP reloads.
ENTRYPOINT ["/usr/local/bin/tether"]
CMD ["-c", "/etc/tether/tether.toml"]
