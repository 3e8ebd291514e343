"""Error, close and priority codes are defined once per language (Python IntEnums, Rust
consts, a JS module) and all three match the tables of docs/protocol.md."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from gateway.protocol.codes import CloseCode, ErrorCode, Priority

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text()
RUST = (ROOT / "rust" / "gateway-core" / "src" / "protocol" / "codes.rs").read_text()
#: Close codes the engine reports for a peer's close but never sends (RFC 6455 §7.4.1).
REPORTED_ONLY = {1005, 1006}


def _table(heading: str) -> set[int]:
    """The first-column numbers of the table under ``## <heading>``."""
    section = DOC.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}


def _rust_mod(name: str) -> set[int]:
    body = RUST.split(f"pub mod {name} {{", 1)[1].split("\n}", 1)[0]
    return {int(v) for v in re.findall(r"pub const \w+: \w+ = (\d+);", body)}


def test_the_docs_have_the_three_tables() -> None:
    assert {4000, 4029, 4030, 5000} <= _table("Error codes")
    assert {1000, 1012, 4008, 4029} <= _table("Close codes")
    assert _table("Priorities") == {0, 1, 2}


def test_python_codes_match_the_docs() -> None:
    assert {int(c) for c in ErrorCode} == _table("Error codes")
    assert {int(c) for c in CloseCode} == _table("Close codes")
    assert {int(p) for p in Priority} == _table("Priorities")


def test_rust_codes_match_the_docs() -> None:
    assert _rust_mod("error") == _table("Error codes")
    assert _rust_mod("close") - REPORTED_ONLY == _table("Close codes")
    prios = {int(v) for v in re.findall(r"pub const PRIO_\w+: \w+ = (\d+);", RUST)}
    assert prios == _table("Priorities")


def test_js_codes_match_the_docs() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed for the JS SDK (installed on every machine of this project)")
    src = (ROOT / "clients" / "js" / "src" / "codes.js").as_uri()
    script = f"import('{src}').then(m => console.log(JSON.stringify({{e: m.ErrorCode, c: m.CloseCode, p: m.Priority}})))"
    out = json.loads(subprocess.run([node, "--input-type=module", "-e", script], check=True, capture_output=True, text=True).stdout)
    assert set(out["e"].values()) == _table("Error codes")
    assert set(out["c"].values()) == _table("Close codes")
    assert set(out["p"].values()) == _table("Priorities")
