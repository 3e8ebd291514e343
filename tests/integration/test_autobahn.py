"""Autobahn|Testsuite conformance of the engine: the quick set (cases 1-8 and 10; 9, 12 and
13 are left to ``tools/autobahn.sh`` without ``--quick``) must have 0 FAILED, over ``ws://``
and over ``wss://`` (the engine's TLS listener, issue 13).

The suite runs against ``examples/echo_app.py``, i.e. through the same engine code path as
production traffic. It is installed on first use by the shared runner; if that install
fails, these tests FAIL (they never skip): conformance is a release requirement.

Over TLS the certificate is verified. The fuzzingclient (Twisted, Python 2) verifies a
server only when its spec entry has a ``"hostname"``: it then builds the connection with
Twisted's ``optionsForClientTLS(hostname)``, which checks the chain against OpenSSL's
default paths (replaced here by ``SSL_CERT_FILE`` = the test root and an empty
``SSL_CERT_DIR``) and the name with service_identity. Without a hostname it uses
``ClientContextFactory``, which accepts any certificate, and the shared ``run.sh`` writes
no hostname: so ``tools/autobahn.sh --tls`` writes the spec and runs the installed wstest
itself. :func:`test_autobahn_over_tls_verifies_the_certificate` is the control: trusting
another root, the first case fails before any HTTP is exchanged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT
from support.certs import TestCA

SCRIPT = ROOT / "tools" / "autobahn.sh"
SUMMARY = re.compile(r"^autobahn: OK=(\d+) NON-STRICT=(\d+) INFORMATIONAL=(\d+) UNIMPLEMENTED=(\d+) FAILED=(\d+)", re.MULTILINE)


def run_autobahn(report_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, int], str]:
    """``tools/autobahn.sh ARGS``: the process, its summary counts and the output's tail."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        check=False,
        cwd=ROOT,
        env=dict(os.environ, PYTHON=sys.executable, AUTOBAHN_REPORT_DIR=str(report_dir), **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,  # first use installs the suite (about 30 s), the run takes about 10 s
    )
    out = proc.stdout
    tail = "\n".join(out.splitlines()[-40:])
    assert proc.returncode != 2, f"the Autobahn suite could not be installed or the echo app not started:\n{tail}"
    m = SUMMARY.search(out)
    assert m, f"no Autobahn summary in the output:\n{tail}"
    counts = dict(zip(("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"), map(int, m.groups()), strict=True))
    run = re.search(r"cases run: (\d+) of (\d+)", out)
    assert run and run.group(1) == run.group(2), f"cases missing from the report:\n{tail}"
    return proc, counts, tail


@pytest.mark.autobahn
@pytest.mark.timeout(960)  # the run's own bound is 900 s (first use installs the suite)
def test_autobahn_quick_has_no_failed_case(tmp_path: Path) -> None:
    proc, counts, tail = run_autobahn(tmp_path / "autobahn", "--quick")
    assert counts["FAILED"] == 0, f"{counts['FAILED']} Autobahn case(s) FAILED:\n{tail}"
    assert counts["OK"] > 0
    assert proc.returncode == 0, tail


@pytest.mark.autobahn
@pytest.mark.timeout(1860)
def test_autobahn_quick_over_tls_has_no_failed_case(tmp_path: Path) -> None:
    # One case first: when TLS is broken every case fails at the handshake timeout (5 s
    # each, 20 minutes for the set), and one says as much.
    proc, counts, tail = run_autobahn(tmp_path / "autobahn-tls-first", "--tls", "--cases", "1.1.1")
    assert counts["OK"] == 1 and proc.returncode == 0, f"case 1.1.1 over wss:// did not pass:\n{tail}"
    proc, counts, tail = run_autobahn(tmp_path / "autobahn-tls", "--tls", "--quick")
    assert counts["FAILED"] == 0, f"{counts['FAILED']} Autobahn case(s) FAILED over wss://:\n{tail}"
    assert counts["OK"] > 200, counts
    assert proc.returncode == 0, tail


@pytest.mark.autobahn
@pytest.mark.timeout(960)
def test_autobahn_over_tls_verifies_the_certificate(tmp_path: Path) -> None:
    foreign = TestCA(tmp_path / "foreign-ca")  # a root that did not issue the echo app's certificate
    report = tmp_path / "autobahn-tls-foreign"
    proc, counts, tail = run_autobahn(report, "--tls", "--cases", "1.1.1", env={"AUTOBAHN_TLS_CAFILE": str(foreign.root_file)})
    assert counts["FAILED"] == 1 and counts["OK"] == 0 and proc.returncode == 1, tail
    case = json.loads(next((report / "reports" / "servers").glob("gateway_case_1_1_1.json")).read_text())
    # Refused in the TLS handshake: no HTTP request was answered.
    assert case["httpResponse"] in ("?", "", None), case["httpResponse"]
    assert "dropped" in (case["wasNotCleanReason"] or ""), case["wasNotCleanReason"]
