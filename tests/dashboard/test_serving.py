"""The dashboard serves this machine only unless asked on purpose: started by
`streamlit run` without the repository's config (every network interface), the app shows
one error naming the fix and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit import config
from streamlit.testing.v1 import AppTest

from dashboard.serving import ALLOWED_HOST, exposure

APP = str(Path(__file__).parents[2] / "dashboard" / "app.py")


def test_only_this_machine_unless_chosen():
    for address in ("", None, "0.0.0.0", "192.168.1.5", "example.org", "::"):
        assert "--server.address 127.0.0.1" in exposure(address, None)
    for address in ("127.0.0.1", "localhost", "::1"):
        assert exposure(address, None) is None
    assert exposure("0.0.0.0", "0.0.0.0") is None  # `modeldiff dashboard --host 0.0.0.0`
    assert exposure("", "0.0.0.0") is not None  # not what was chosen


@pytest.mark.parametrize("address", ["", "0.0.0.0"])
def test_the_app_refuses_every_interface(address, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELDIFF_DB", str(tmp_path / "results.duckdb"))
    monkeypatch.delenv(ALLOWED_HOST, raising=False)
    before = config.get_option("server.address")
    config.set_option("server.address", address)
    try:
        at = AppTest.from_file(APP, default_timeout=60).run()
    finally:
        config.set_option("server.address", before)
    assert not at.exception
    assert len(at.error) == 1 and "127.0.0.1" in at.error[0].value
    assert not at.sidebar.caption  # nothing of the database was shown
    assert not (tmp_path / "results.duckdb").exists()


def test_modeldiff_dashboard_passes_the_chosen_host(tmp_path, monkeypatch):
    import subprocess

    from engine.cli import main
    from engine.results import Database

    with Database(tmp_path / "r.duckdb"):
        pass
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: calls.append(env) or 0)
    assert main(["dashboard", "--db", str(tmp_path / "r.duckdb"), "--host", "0.0.0.0"]) == 0
    assert calls[0][ALLOWED_HOST] == "0.0.0.0"
    assert os.environ.get(ALLOWED_HOST) is None  # only the server's environment
