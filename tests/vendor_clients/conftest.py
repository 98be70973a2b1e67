"""One CRM emulator over HTTPS for the whole run, trusted through the test CA.

The emulator is `trusst-cdc crm-emulator` with the shipped schema and the certificate that
`scripts/services.sh tls-certs` makes in `.run/tls`. `TRUSST_CDC_BIN` names the binary (default
`$CARGO_TARGET_DIR/debug/trusst-cdc`, else `target/debug/trusst-cdc`); `VENDOR_EMULATOR_URL` uses
an emulator already running instead (it must serve HTTPS with a certificate the CA signed).
Every test starts from an empty emulator: records, jobs, counters and faults are reset.
"""

import os
import pathlib
import subprocess

import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
TLS = pathlib.Path(os.environ.get("TLS_DIR", ROOT / ".run" / "tls"))

# requests (under MSAL, azure-core, the Dataverse SDK and simple-salesforce alike) reads this for
# every request, so the libraries trust the emulator without being told anything themselves. The
# suite talks to nothing else, so the test CA replaces whatever bundle the environment names.
os.environ["REQUESTS_CA_BUNDLE"] = str(TLS / "ca.pem")


class Emulator:
    """The emulator's base URL and its admin API (`/__admin/`), which shows what arrived."""

    def __init__(self, base):
        self.base = base

    def _admin(self, method, path, **kw):
        r = requests.request(method, f"{self.base}/__admin/{path}", timeout=10, **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def records(self, system, obj):
        """Stored records of one object (`dataverse`/`contact`, `salesforce`/`Contact`)."""
        return self._admin("GET", f"records/{system}/{obj}")

    def by_key(self, system, obj, key):
        """Stored records by their external id / alternate key column."""
        return {r[key]: r for r in self.records(system, obj)}

    def calls(self, system, route):
        """Calls counted for one route (`METHOD /path/{param}`), by status."""
        return self._admin("GET", "stats")["calls"].get(system, {}).get(route, {})

    def tokens_issued(self, system):
        return self._admin("GET", "stats")["tokens_issued"].get(system, 0)

    def faults(self, patch):
        self._admin("POST", "faults", json=patch)

    def action(self, name):
        """`reset`, `reset-limits` or `expire-tokens`."""
        self._admin("POST", name)


def _binary():
    if os.environ.get("TRUSST_CDC_BIN"):
        return os.environ["TRUSST_CDC_BIN"]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return str(target / "debug" / "trusst-cdc")


@pytest.fixture(scope="session")
def emulator():
    if os.environ.get("VENDOR_EMULATOR_URL"):
        yield Emulator(os.environ["VENDOR_EMULATOR_URL"].rstrip("/"))
        return
    for name in ("server.pem", "server.key", "ca.pem"):
        if not (TLS / name).exists():
            pytest.exit(f"{TLS / name} is missing: run scripts/services.sh tls-certs", 2)
    proc = subprocess.Popen(
        [
            _binary(), "crm-emulator",
            "--config", str(ROOT / "connector-config" / "crm-emulator.toml"),
            "--listen", "127.0.0.1:0",
            "--tls-cert", str(TLS / "server.pem"),
            "--tls-key", str(TLS / "server.key"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TRUSST_LOG": "warn"},
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on https://"):
        proc.kill()
        pytest.exit(f"the emulator did not start over HTTPS: {line!r}", 2)
    try:
        yield Emulator(line.removeprefix("listening on "))
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True)
def fresh(emulator):
    emulator.action("reset")
    emulator.action("reset-limits")
    requests.delete(f"{emulator.base}/__admin/faults", timeout=10).raise_for_status()
    yield
