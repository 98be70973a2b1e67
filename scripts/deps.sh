#!/usr/bin/env bash
# Installs what building and running trusst-cdc needs on a fresh Debian machine, only when missing:
# a C toolchain (librdkafka is built from its vendored sources, with OpenSSL for TLS), PostgreSQL
# client/server (services.sh installs the server), Java 17+ and Maven (the Kafka broker), curl,
# openssl (the test certificates) and python3-venv (scripts/test.sh installs moto from PyPI).
# Rust itself comes from the machine (rustup); nothing here downloads outside Debian, crates.io,
# PyPI and Maven Central.
set -euo pipefail

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v make >/dev/null || need+=(make)
command -v perl >/dev/null || need+=(perl)
command -v python3 >/dev/null || need+=(python3)
# The secrets tests install moto into a venv; librdkafka's TLS (security.protocol=SSL) links OpenSSL.
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v openssl >/dev/null || need+=(openssl)
[[ -f /usr/include/openssl/ssl.h ]] || need+=(libssl-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v java >/dev/null || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
command -v curl >/dev/null || need+=(curl)
command -v flock >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    echo "deps: installing ${need[*]} from Debian" >&2
    sudo_=()
    [[ $(id -u) == 0 ]] || sudo_=(sudo)
    "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
command -v cargo >/dev/null || {
    echo "deps: cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
}
