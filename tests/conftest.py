import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def plugin_command():
    """The console script Kong's start and query commands run."""
    script = shutil.which("kong-oauth2-introspection",
                          path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    assert script, "kong-oauth2-introspection is not installed (pip install .)"
    return [script]


@pytest.fixture(scope="module")
def kong():
    """A Kong stand-in driving the real plugin server over its Unix socket."""
    from kong import KongStandIn
    with KongStandIn(plugin_command()) as standin:
        yield standin


from authserver_fixture import auth_server  # noqa: E402,F401 - the real authorization server


# -- no secret in any log (issue 9): every plugin-server log and every kong.log
# line of the whole run is searched for the tests' own tokens and secrets.

_LOGS = []
# Tally of every request through any stand-in: the figure issue 8 asks for.
_TALLY = {"requests": 0, "proxied": 0, "passed unauthenticated": 0, "spoofed identity": 0}  # ours only
_SPOOF_VALUES = {"evil"}
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|AUTH|_KEY$|^KEY)")


@pytest.fixture(autouse=True, scope="session")
def _collect_logs():
    from kong import standin
    close, request = standin.KongStandIn.close, standin.KongStandIn.request

    def closing(self):
        try:
            _LOGS.append(("plugin server log", self.server_log()))
        finally:
            close(self)

    def requesting(self, *args, **kwargs):
        result = request(self, *args, **kwargs)
        if not any("kong-oauth2-introspection" in str(part) for part in self.command):
            return result  # a probe or floor plugin (some show kong-pdk failing open)
        _TALLY["requests"] += 1
        if result.proxied:
            _TALLY["proxied"] += 1
            if result.passed_unauthenticated:
                _TALLY["passed unauthenticated"] += 1
            up = result.upstream.headers if result.upstream is not None else {}
            # (With another plugin's credential, its consumer headers are its own.)
            other_plugin = kwargs.get("authenticated") or kwargs.get("authenticated_consumer")
            if not other_plugin and any(v in _SPOOF_VALUES for k in up for v in up.getall(k)
                   if k.lower().startswith(("x-consumer-", "x-credential-"))):
                _TALLY["spoofed identity"] += 1
        if result.logs:
            _LOGS.append(("kong.log", "\n".join(m for _, m in result.logs)))
        return result
    standin.KongStandIn.close, standin.KongStandIn.request = closing, requesting
    yield
    standin.KongStandIn.close, standin.KongStandIn.request = close, request


def _test_secrets():
    """Module-level constants of the test modules that hold a token or a secret."""
    found = set()
    for name, module in list(sys.modules.items()):
        if not getattr(module, "__file__", None) or not str(module.__file__).startswith(
                str(ROOT / "tests")):
            continue
        for attr, value in vars(module).items():
            if isinstance(value, str) and len(value) >= 10 and _SECRET_NAME.search(attr) \
                    and " " not in value.strip().split(" ", 1)[-1]:
                found.add(value.split(" ", 1)[-1] if value.startswith(("Basic ", "Bearer "))
                          else value)
    return found


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and _TALLY["requests"]:
        reporter.write_line("stand-in requests: " + ", ".join("%s %d" % kv for kv in _TALLY.items()))
    if not _LOGS:
        return
    secrets = _test_secrets()
    leaks = sorted({(where, secret[:6] + "...") for where, text in _LOGS for secret in secrets
                    if secret in text})
    if leaks:
        if reporter is not None:
            reporter.write_line("SECRETS IN LOGS: %r" % leaks, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        reporter.write_line("no secret in logs: %d secret values searched in %d log texts"
                            % (len(secrets), len(_LOGS)))
