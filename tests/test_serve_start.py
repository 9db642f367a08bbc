"""Issue 19 item 8: ``serve`` fails to start with one line naming the path (an
unwritable socket directory, a prefix too long for a Unix socket), and refuses to
take the socket of a server that is answering on it; a stale socket file nobody
listens on is still replaced."""

import os
import socket
import subprocess
import time

from conftest import plugin_command
from kong import KongStandIn
from test_plugin_kong import bearer, config
from idp_double import IdPDouble

def serve(prefix, timeout=30):
    return subprocess.run(plugin_command() + ["serve", "-kong-prefix", str(prefix)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)

def one_line(out):
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    error_lines = [line for line in lines if "info:" not in line]
    assert len(error_lines) == 1, out.stderr
    return error_lines[0]

def test_a_socket_directory_it_may_not_write_is_one_line_naming_the_path(tmp_path):
    if os.geteuid() == 0:
        prefix = "/sys/kernel"   # where even root may not create a socket (EPERM)
    else:
        prefix = tmp_path / "ro"
        prefix.mkdir(mode=0o500)
    line = one_line(serve(prefix))
    assert "cannot listen on %s/oauth2-introspection.sock" % prefix in line, line
    assert "writable" in line and ("not permitted" in line or "denied" in line), line

def test_a_prefix_too_long_for_a_unix_socket_is_one_line(tmp_path):
    prefix = tmp_path / ("p" * 60) / ("q" * 60)
    prefix.mkdir(parents=True)
    line = one_line(serve(prefix))
    assert str(prefix) in line and "longer than the 107" in line, line

def test_a_second_server_does_not_take_a_live_socket():
    with IdPDouble() as idp, KongStandIn(plugin_command()) as kong:
        before = os.stat(kong.socket_path).st_ino
        line = one_line(serve(os.path.dirname(kong.socket_path)))
        assert "another server is answering on %s" % kong.socket_path in line, line
        assert os.stat(kong.socket_path).st_ino == before
        inst = kong.configure(config(idp))
        assert kong.request(inst, "GET", "/", headers=bearer("tok-still-served")).status == 200

def test_a_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "oauth2-introspection.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()   # the file stays, nobody listens: a server that died
    proc = subprocess.Popen(plugin_command() + ["serve", "-kong-prefix", str(tmp_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        until = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                break
            except OSError:
                assert time.monotonic() < until, "the server never listened"
                time.sleep(0.05)
            finally:
                probe.close()
    finally:
        proc.terminate()
        proc.wait(10)
