"""`dagster dev` starts for real on 127.0.0.1 and its GraphQL API shows every asset and check of the pipeline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT

QUERY = """{ assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } } }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_dagster_dev_serves_the_whole_asset_graph(tmp_path: Path):
    from pipelines.definitions import defs

    expected_assets = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    expected_checks = {(c.asset_key.to_user_string(), c.name) for c in defs.resolve_asset_graph().asset_check_keys}
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.Popen(
        [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        nodes = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and nodes is None:
            assert proc.poll() is None, "dagster dev exited early"
            try:
                data = _graphql(port, QUERY).get("data") or {}
                nodes = data.get("assetNodes") or None
            except OSError:
                pass
            if nodes is None:
                time.sleep(2)
        assert nodes is not None, "dagster dev did not serve the asset graph within 180 s"
        assets = {"/".join(n["assetKey"]["path"]) for n in nodes}
        checks = {("/".join(n["assetKey"]["path"]), c["name"])
                  for n in nodes for c in (n["assetChecksOrError"] or {}).get("checks", [])}
        assert assets == expected_assets
        assert checks == expected_checks
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
