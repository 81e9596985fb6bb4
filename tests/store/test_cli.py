"""The ``fedmerge store`` commands on a store written by the tests (tables and --json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from store_test_helpers import commit_delta, contributor, tiny_delta, tiny_model
from typer.testing import CliRunner

from fedmerge.store import ModelStore
from fedmerge.store.cli import app

runner = CliRunner()


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    with ModelStore.open(path) as store:
        base = tiny_model()
        root = store.commit_base(base, name="tiny")
        v = root
        for r in range(1, 4):
            v = commit_delta(store, tiny_delta(base, r), v.id, r, contributors=[contributor(r)])
        store.set_alias("prod", "v000003")
    return path


def run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_versions_show_lineage_diff_json(populated: Path) -> None:
    listed = json.loads(run("versions", "--store", str(populated), "--json"))
    assert [v["id"] for v in listed] == ["v000004", "v000003", "v000002", "v000001"]
    assert listed[0]["aliases"] == ["latest"] and listed[1]["aliases"] == ["prod"]
    assert [
        v["id"] for v in json.loads(run("versions", "--store", str(populated), "--round", "2", "--json"))
    ] == ["v000003"]
    shown = json.loads(run("show", "--store", str(populated), "prod", "--json"))
    assert shown["id"] == "v000003" and shown["contributors"][0]["client_id"] == "client-2"
    lineage = json.loads(run("lineage", "--store", str(populated), "latest", "--json"))
    assert lineage["parents"]["v000004"] == ["v000003"] and lineage["parents"]["v000001"] == []
    diff = json.loads(run("diff", "--store", str(populated), "v000001", "v000002", "--json"))
    assert diff["total_change_norm"] > 0 and {t["name"] for t in diff["tensors"]} == set(tiny_model())


def test_tables_render(populated: Path) -> None:
    assert "v000004" in run("versions", "--store", str(populated))
    assert "client-3" in run("show", "--store", str(populated), "latest")
    assert "v000001" in run("lineage", "--store", str(populated), "latest")
    assert "embed.weight" in run("diff", "--store", str(populated), "v000001", "latest")
    assert "prod" in run("alias", "--store", str(populated))
    assert "ok" in run("verify", "--store", str(populated))


def test_alias_rollback_export_verify_gc(populated: Path, tmp_path: Path) -> None:
    run("alias", "--store", str(populated), "prod", "v000004")
    assert json.loads(run("rollback", "--store", str(populated), "prod", "--json")) == {
        "alias": "prod",
        "version": "v000003",
    }
    out = tmp_path / "exported"
    result = json.loads(run("export", "--store", str(populated), "prod", "--out", str(out), "--json"))
    assert result["version"] == "v000003" and (out / "model.safetensors").exists()
    assert json.loads(run("verify", "--store", str(populated), "--json"))["ok"] is True
    assert (
        json.loads(run("gc", "--store", str(populated), "--grace-seconds", "0", "--json"))["removed_blobs"]
        == []
    )


def test_errors_exit_1_with_a_message(populated: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["show", "--store", str(populated), "v000042"])
    assert result.exit_code == 1 and "v000042" in result.output
    result = runner.invoke(app, ["versions", "--store", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "not a model store" in result.output
    blob = next((populated / "blobs").rglob("*.safetensors"))
    blob.write_bytes(b"garbage")
    result = runner.invoke(app, ["verify", "--store", str(populated), "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["problems"][0]["kind"] == "corrupt_blob"


def test_versions_counts_accepted_and_rejected_contributors_as_show_lists_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmerge.store import cli

    monkeypatch.setattr(cli.console, "width", 160)  # a wide terminal: cells are not wrapped
    path = tmp_path / "store"
    with ModelStore.open(path) as store:
        base = tiny_model()
        root = store.commit_base(base, name="tiny")
        people = [
            contributor(1),
            contributor(2, accepted=False),
            contributor(3, accepted=False),
        ]
        commit_delta(store, tiny_delta(base, 1), root.id, 1, contributors=people)
    listed = json.loads(run("versions", "--store", str(path), "--json"))
    assert listed[0]["contributors"] == {"total": 3, "accepted": 1, "rejected": 2}
    assert listed[1]["contributors"] == {"total": 0, "accepted": 0, "rejected": 0}
    shown = json.loads(run("show", "--store", str(path), "latest", "--json"))
    assert len(shown["contributors"]) == 3
    table = run("versions", "--store", str(path))
    assert "3 (2 rejected)" in table
