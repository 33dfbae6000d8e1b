"""The committed contract documents are exactly what the code generates."""

import json
import subprocess
import sys
from pathlib import Path

from hub.cli._schema_export import documents, export
from schemas import MESSAGES, subjects

ROOT = Path(__file__).resolve().parents[3]


def test_committed_documents_match_the_code():
    differing = export(ROOT / "docs", check=True)
    assert differing == [], (
        "docs/ is out of date with schemas/: run `cowork schema export` and commit the result"
    )


def test_asyncapi_covers_every_family_and_message():
    doc = json.loads(documents()["asyncapi.json"])
    assert doc["asyncapi"].startswith("3.")
    assert {c["address"] for c in doc["channels"].values()} == {
        f.template for f in subjects.FAMILIES
    }
    assert set(doc["components"]["messages"]) == {m.replace(".", "_") for m in MESSAGES}
    for op in doc["operations"].values():
        assert op["action"] in {"send", "receive"}
    # every $ref resolves inside the document
    text = documents()["asyncapi.json"]
    for ref in {r.split('"')[0] for r in text.split('"$ref": "')[1:]}:
        node = doc
        for part in ref.lstrip("#/").split("/"):
            node = node[part]


def test_export_detects_drift_and_stale_files(tmp_path):
    assert export(tmp_path, check=True)  # nothing written yet: everything differs
    export(tmp_path)
    assert export(tmp_path, check=True) == []
    (tmp_path / "schemas" / "gone.message.json").write_text("{}")
    (tmp_path / "asyncapi.json").write_text("{}")
    differing = {p.name for p in export(tmp_path, check=True)}
    assert differing == {"gone.message.json", "asyncapi.json"}
    export(tmp_path)
    assert not (tmp_path / "schemas" / "gone.message.json").exists()


def test_cli_check_exits_non_zero_on_drift(tmp_path):
    cowork = [sys.executable, "-m", "hub.cli"]
    bad = subprocess.run(
        cowork + ["schema", "export", "--check", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "out of date" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run(
        cowork + ["schema", "export", "--check", "--out", str(ROOT / "docs")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
