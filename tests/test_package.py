"""The package as a user installs it: an sdist and a wheel built the PEP 517 way
(``python -m build``: the sdist from the tree, the wheel from the sdist), the
wheel installed into a new virtual environment with no source tree around (its
own directory as cwd, no PYTHONPATH), and that installation run as Kong runs it:
the query command, ``check`` on a copy of kong.yml, a request through the Kong
stand-in, and ``[tracing]`` exporting spans.

pip fetches the dependencies as for any user (from its cache when warm)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from conftest import ROOT
from kong import KongStandIn
from test_plugin_kong import bearer
from test_tracing import Collector

SCRIPT = "kong-oauth2-introspection"
DECLARED = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def clean_env(**extra):
    """This environment less what would let the source tree or the test venv in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return dict(env, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)


def run(cmd, cwd, timeout=600, **kw):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True,
                         text=True, timeout=timeout, **kw)
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(sdist, wheel) built from this tree."""
    out_dir = tmp_path_factory.mktemp("dist")
    built = run([sys.executable, "-m", "build", "--outdir", out_dir, ROOT], cwd=out_dir)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    sdists, wheels = sorted(out_dir.glob("*.tar.gz")), sorted(out_dir.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(out_dir.iterdir())
    return sdists[0], wheels[0]


@pytest.fixture(scope="module")
def venv(tmp_path_factory, dist):
    """A new virtual environment holding the wheel and its dependencies, nothing else."""
    home = tmp_path_factory.mktemp("user")
    made = run([sys.executable, "-m", "venv", home / "venv"], cwd=home)
    assert made.returncode == 0, made.stderr
    bindir = home / "venv" / "bin"
    installed = run([bindir / "python", "-m", "pip", "install", "-q", dist[1]], cwd=home)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return home, bindir


def test_wheel_and_sdist_carry_the_schemas_the_guard_and_the_metadata(dist):
    sdist, wheel = dist
    assert wheel.name == f"kong_oauth2_introspection-{DECLARED}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        # package data, byte for byte what the repository holds
        for schema in sorted((ROOT / "schema").glob("*.json")):
            assert whl.read(f"kong_oauth2_introspection/schemadata/{schema.name}") \
                == schema.read_bytes()
        assert whl.read("kong_oauth2_introspection/ops/guard.lua") \
            == (ROOT / "kong-plugin/kong_oauth2_introspection/ops/guard.lua").read_bytes()
        info = f"kong_oauth2_introspection-{DECLARED}.dist-info/"
        meta = Parser().parsestr(whl.read(info + "METADATA").decode())
        entry_points = whl.read(info + "entry_points.txt").decode()
    for package in ("", "server/", "client_credentials/"):
        assert f"kong_oauth2_introspection/{package}__init__.py" in names
    assert not any(n.startswith(("tests/", "bench/", "docker/")) for n in names)
    assert meta["Name"] == "kong-oauth2-introspection" and meta["Version"] == DECLARED
    assert meta["License-Expression"] == "Apache-2.0"
    assert "tracing" in meta.get_all("Provides-Extra")
    assert any(r.startswith("kong-pdk==") for r in meta.get_all("Requires-Dist"))
    assert f"{SCRIPT} = kong_oauth2_introspection.cli:main" in entry_points
    # the CHANGELOG has an entry for the version being built
    assert "## [%s]" % DECLARED in (ROOT / "CHANGELOG.md").read_text()
    with tarfile.open(sdist) as tar:
        top = f"kong_oauth2_introspection-{DECLARED}/"
        members = {m.name[len(top):] for m in tar.getmembers()}
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "schema/oauth2-introspection.json",
            "kong-plugin/kong_oauth2_introspection/ops/guard.lua"} <= members
    assert not any(m.startswith("tests/") for m in members)


def test_installed_wheel_answers_the_query_command_and_checks_kong_yml(venv):
    home, bindir = venv
    # the installation's own files, not the tree's
    where = run([bindir / "python", "-c",
                 "import kong_oauth2_introspection as p; print(p.__file__)"], cwd=home)
    assert Path(where.stdout.strip()).is_relative_to(home / "venv"), where
    version = run([bindir / SCRIPT, "--version"], cwd=home)
    assert version.stdout == f"{SCRIPT} {DECLARED}\n", version

    dump = run([bindir / SCRIPT, "dump", "--plugin", "oauth2-introspection"], cwd=home)
    if dump.returncode == 2 and "unrecognized arguments" in dump.stderr:
        dump = run([bindir / SCRIPT, "dump"], cwd=home)  # a build before --plugin
        info = json.loads(dump.stdout)
    else:
        assert dump.returncode == 0, dump.stderr
        info = json.loads(dump.stdout)
        assert [p["Name"] for p in info] == ["oauth2-introspection"]
    ours = next(p for p in info if p["Name"] == "oauth2-introspection")
    assert ours["Version"] == DECLARED and ours["Schema"]["name"] == "oauth2-introspection"

    shutil.copy(ROOT / "kong.yml", home / "kong.yml")
    checked = run([bindir / SCRIPT, "check", "kong.yml"], cwd=home)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (home / "broken.yml").write_text((ROOT / "kong.yml").read_text().replace(
        "ttl: 30", "ttl: -30", 1))
    broken = run([bindir / SCRIPT, "check", "broken.yml"], cwd=home)
    assert broken.returncode == 1 and "config.ttl" in broken.stdout, broken

    guard = run([bindir / SCRIPT, "guard"], cwd=home)
    assert guard.returncode == 0 and "return kong.response.exit(503" in guard.stdout


def test_a_request_through_kong_reaches_the_installed_server(venv, auth_server, monkeypatch):
    home, bindir = venv
    monkeypatch.chdir(home)  # Kong starts the server from its own cwd, not the tree's
    with KongStandIn([str(bindir / SCRIPT)]) as kong:
        assert kong.name == "oauth2-introspection"
        inst = kong.configure({"introspection_url": auth_server.introspection_url,
                               "authorization_value": auth_server.introspector_authorization})
        r = kong.request(inst, "GET", "/", headers=bearer(auth_server.issue_token("alice-app")))
        assert r.status == 200 and r.upstream.headers["X-Credential-Client-ID"] == "alice-app"
        refused = kong.request(inst, "GET", "/")
        assert refused.status == 401 and not refused.proxied
        # the kernel ran the script's interpreter: the new environment's python
        argv = Path(f"/proc/{kong.pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[0] == str(bindir / "python") and argv[1] == str(bindir / SCRIPT), argv


def test_tracing_extra_installs_from_the_wheel_and_exports_spans(venv, dist, auth_server,
                                                                  monkeypatch):
    home, bindir = venv
    extra = run([bindir / "python", "-m", "pip", "install", "-q", f"{dist[1]}[tracing]"],
                cwd=home)
    assert extra.returncode == 0, extra.stdout[-3000:] + extra.stderr[-3000:]
    monkeypatch.chdir(home)
    collector = Collector()
    try:
        cmd = [str(bindir / SCRIPT), "serve", "--otlp-endpoint", collector.url]
        with KongStandIn(cmd, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as kong:
            inst = kong.configure({"introspection_url": auth_server.introspection_url,
                                   "authorization_value": auth_server.introspector_authorization})
            token = auth_server.issue_token("alice-app")
            assert kong.request(inst, "GET", "/", headers=bearer(token)).status == 200
            spans = collector.wait_for(lambda s: s.name == "oauth2-introspection introspect")
            assert "not installed" not in kong.server_log()
        assert spans[0][0] == SCRIPT  # the service name the installed SDK reported
    finally:
        collector.close()
