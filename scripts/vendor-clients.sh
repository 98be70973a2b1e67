#!/usr/bin/env bash
# Runs the vendors' own client libraries, unchanged, against the CRM emulator over HTTPS
# (tests/vendor_clients): Microsoft's Dataverse SDK for Python with azure-identity, and
# simple-salesforce. The libraries come from PyPI, pinned in tests/vendor_clients/requirements.txt,
# into .cache/vendor-venv (git-ignored; reinstalled when the pins change). The suite starts its own
# emulator with the test certificate from .run/tls (made here when missing), trusts the test CA
# through REQUESTS_CA_BUNDLE, and reads every record back through the emulator's admin API.
#
#   scripts/vendor-clients.sh                 build the binary if needed, run the suite
#   scripts/vendor-clients.sh -k bulk         pytest arguments pass through
#
# Environment: TRUSST_CDC_BIN (the binary; default ${CARGO_TARGET_DIR:-target}/debug/trusst-cdc),
# VENDOR_EMULATOR_URL (use a running HTTPS emulator instead of starting one).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.cache/vendor-venv
requirements=tests/vendor_clients/requirements.txt
stamp=$venv/requirements.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ ! -x $venv/bin/pytest ]] || [[ $(cat "$stamp" 2>/dev/null) != "$want" ]]; then
    echo "vendor-clients: installing $requirements from PyPI into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements" >&2
    echo "$want" >"$stamp"
fi

scripts/services.sh tls-certs
if [[ -z ${VENDOR_EMULATOR_URL:-} && -z ${TRUSST_CDC_BIN:-} ]]; then
    cargo build --locked --bin trusst-cdc
fi
# No __pycache__ in the source tree.
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/pytest" -q tests/vendor_clients "$@"
