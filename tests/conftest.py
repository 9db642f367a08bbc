import os
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
