# syntax=docker/dockerfile:1
# sluice in a container: built on the Rust image, run from a distroless base as a non-root
# user. The binary needs only glibc (TLS is rustls with its own roots; SQLite is bundled).
#   docker build -t sluice .
#   docker run -p 8000:8000 -e OPENAI_API_KEY=sk-... sluice

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The repository's release profile keeps debug info for profiling; the image does not.
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY bench bench
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
    && cp target/release/sluice /usr/local/bin/sluice

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
# The working directory holds the default SQLite log (sluice.db); mount a volume here to
# keep it, or point storage.url at PostgreSQL.
WORKDIR /home/nonroot
USER nonroot
ENV SLUICE_SERVER__LISTEN=0.0.0.0:8000
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve"]
