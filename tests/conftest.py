import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# ``serve`` runs one process per CPU by default; the tests count IdP calls, read
# one process's metrics and signal "the" server, so they run one process unless
# they ask for more (tests/test_processes.py passes --processes, which wins).
# Servers the tests start directly inherit this; the stand-in, which passes its
# server only what ``env`` says (as nginx does), gets it through _collect_logs.
PROCESSES_ENV = "OAUTH2_INTROSPECTION_PROCESSES"
os.environ.setdefault(PROCESSES_ENV, "1")


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


@pytest.fixture(scope="module")
def cc_kong():
    """The stand-in for oauth2-client-credentials' own plugin server (one plugin per
    server, as Kong 3.9 registers them)."""
    from kong import KongStandIn
    with KongStandIn(plugin_command() + ["serve", "--plugin", "oauth2-client-credentials"]) as standin:
        yield standin


from authserver_fixture import auth_server  # noqa: E402,F401 - the real authorization server


# -- no secret in any log (issue 9): every plugin-server log and every kong.log
# line of the whole run is searched for the tests' own tokens and secrets.

_LOGS = []
# Tally of every request through any stand-in: the figure issue 8 asks for.
_TALLY = {"requests": 0, "proxied": 0, "passed unauthenticated": 0, "spoofed identity": 0,
          "guard 503": 0}  # ours only
_SPOOF_VALUES = {"evil"}
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|AUTH|_KEY$|^KEY)")


# Kong's set_consumer writes these exact spellings for another plugin's consumer.
_SET_CONSUMER = {"x-consumer-id", "x-consumer-custom-id", "x-consumer-username",
                 "x-credential-identifier", "x-anonymous-consumer"}


def _normalized(name):
    return name.lower().replace("_", "-")


def _owned(instances):
    """Normalized names of every header our plugins own or forward for these configs."""
    owned = {"x-anonymous-consumer"}
    for inst in instances:
        conf = getattr(inst, "conf", None) or {}
        owned.update(_normalized(n) for n in (conf.get("forward_headers") or {}))
        owned.update(_normalized("x-credential-" + c) for c in conf.get("custom_claims_forward") or [])
        if conf.get("upstream_introspection_jwt_header"):
            owned.add(_normalized(conf["upstream_introspection_jwt_header"]))
    return owned


def _spoofed(result, instances, other_plugin):
    """Whether any spelling (case, '-' or '_') of an identity header we own reached
    the upstream with a value the tests only ever send as a spoof."""
    up = result.upstream.headers if result.upstream is not None else {}
    owned = _owned(instances)
    for name in up:
        norm = _normalized(name)
        if not (norm.startswith(("x-consumer-", "x-credential-")) or norm in owned):
            continue
        if other_plugin and name.lower() in _SET_CONSUMER:
            continue   # the other plugin's consumer headers are its own
        if any(v in _SPOOF_VALUES for v in up.getall(name)):
            return True
    return False


def _tally(result, instances, kwargs):
    _TALLY["requests"] += 1
    if result.guard_exit == 503:   # Kong failed open and the guard refused it
        _TALLY["guard 503"] += 1
    if result.proxied:
        _TALLY["proxied"] += 1
        if result.passed_unauthenticated:
            _TALLY["passed unauthenticated"] += 1
        other_plugin = kwargs.get("authenticated") or kwargs.get("authenticated_consumer")
        if _spoofed(result, instances, other_plugin):
            _TALLY["spoofed identity"] += 1
    if result.logs:
        _LOGS.append(("kong.log", "\n".join(m for _, m in result.logs)))


@pytest.fixture(autouse=True, scope="session")
def _collect_logs():
    from kong import chain, standin
    close, request = standin.KongStandIn.close, standin.KongStandIn.request
    init = standin.KongStandIn.__init__

    def initing(self, *args, **kwargs):
        kwargs["env"] = dict({PROCESSES_ENV: os.environ[PROCESSES_ENV]}, **(kwargs.get("env") or {}))
        init(self, *args, **kwargs)
    chained = chain.Chain.request

    def closing(self):
        try:
            _LOGS.append(("plugin server log", self.server_log()))
        finally:
            close(self)

    def ours(standin_):
        return any("kong-oauth2-introspection" in str(part) for part in standin_.command)

    def requesting(self, *args, **kwargs):
        result = request(self, *args, **kwargs)
        if not ours(self):
            return result  # a probe or floor plugin (some show kong-pdk failing open)
        instance = args[0] if args else kwargs.get("instance")
        _tally(result, [instance], kwargs)
        return result

    def chaining(self, *args, **kwargs):
        result = chained(self, *args, **kwargs)
        if any(ours(s) for s, _ in self.pairs):
            _tally(result, [i for _, i in self.pairs], kwargs)
        return result
    standin.KongStandIn.close, standin.KongStandIn.request = closing, requesting
    standin.KongStandIn.__init__ = initing
    chain.Chain.request = chaining
    yield
    standin.KongStandIn.close, standin.KongStandIn.request = close, request
    standin.KongStandIn.__init__ = init
    chain.Chain.request = chained


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
