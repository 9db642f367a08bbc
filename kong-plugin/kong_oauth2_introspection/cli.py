"""The ``kong-oauth2-introspection`` command.

    kong-oauth2-introspection serve --plugin NAME -kong-prefix DIR   Kong's start_cmd
    kong-oauth2-introspection dump --plugin NAME                     Kong's query_cmd
    kong-oauth2-introspection check FILE               a declarative config, offline
    kong-oauth2-introspection guard                    the Kong-side fail-closed guard
    kong-oauth2-introspection purge ...                drop cached answers cluster-wide
    kong-oauth2-introspection health --url URL         is each config's IdP and Redis answering?
    kong-oauth2-introspection docs                     both plugins' option tables (Markdown)

One plugin per server: Kong 3.9 registers only the first plugin a query command
lists, so every ``pluginserver_names`` entry runs ``serve --plugin NAME`` (socket
``PREFIX/NAME.sock``) and ``dump --plugin NAME`` (a one-entry list). NAME is
oauth2-introspection (the default) or oauth2-client-credentials.

kong-pdk's own command line is accepted as it is (``-kong-prefix DIR``, ``-dump``,
``-v``, ``--socket-name``, ``--listen-queue-size``, ``--no-lua-style``, ``-g``), so
a kong.conf written for a kong-pdk plugin keeps working; it serves or dumps the
default plugin unless ``--plugin`` says otherwise. ``-m`` is refused: a process
pool runs only cpu_count events at once, and under a slow IdP the rest wait past
Kong's 60 s and pass unauthenticated.

Exit codes: 0 success; 1 the subcommand's negative answer (``check`` found
problems); 2 usage or input errors. Errors are one line on stderr, never a
traceback.
"""

import argparse
import importlib
import json
import os
import sys
from typing import Callable, Dict, List, Optional

from . import NAME, VERSION
from .plugins import DEFAULT, NAMES

PROG = "kong-oauth2-introspection"

# subcommand -> (module, help); each module has ``main(argv) -> int``.
_DELEGATED: Dict[str, tuple] = {
    "check": ("ops.check", "check the plugin entries of a declarative config (kong.yml) offline"),
    "guard": ("ops.guard", "print the post-function guard that makes Kong fail closed"),
    "purge": ("ops.purge", "drop cached introspection answers on every node sharing Redis"),
    "health": ("ops.health", "ask a running server whether each config's IdP and Redis answer"),
}


def _add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", default=DEFAULT, choices=NAMES,
                        metavar="NAME", help="the one plugin of this plugin server: "
                        + " or ".join(NAMES) + " (default: %(default)s)")


def _dump(name: str) -> int:
    from .plugins import load
    from .server.listener import plugin_info
    # One entry: Kong 3.9 registers only the first one (Kong 2.8 to 3.8 read every one).
    sys.stdout.write(json.dumps([plugin_info(load(name))]))
    return 0


def dump(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{PROG} dump",
                                     description="Print one plugin's info as Kong's query_cmd "
                                                 "reads it (a one-entry JSON list on stdout).")
    _add_plugin_argument(parser)
    return _dump(parser.parse_args(argv).plugin)


def docs(argv: List[str]) -> int:
    from .plugins import NAMES
    names = list(NAMES)
    parser = argparse.ArgumentParser(
        prog=f"{PROG} docs",
        description="Print each plugin's option table (Markdown), generated from its schema.")
    parser.add_argument("--plugin", choices=names, default=None,
                        help="only this plugin's table (default: every plugin's, each under "
                             "a heading naming it)")
    args = parser.parse_args(argv)
    from .schema import load
    if args.plugin:
        sys.stdout.write(load(args.plugin).markdown_table())
        return 0
    sys.stdout.write("\n".join(f"### {name}\n\n{load(name).markdown_table()}" for name in names))
    return 0


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} serve",
        description="Run the plugin server Kong's start_cmd starts: serves one plugin "
                    "on PREFIX/NAME.sock until Kong stops it.")
    _add_plugin_argument(parser)
    parser.add_argument("-p", "--kong-prefix", "-kong-prefix", dest="prefix",
                        default="/usr/local/kong/", help="directory of the Unix socket "
                        "(default: %(default)s)")
    parser.add_argument("--socket-name", default=None,
                        help="socket file name (default: NAME.sock)")
    parser.add_argument("--listen-queue-size", type=int, default=4096)
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="answer every event within this many seconds, whatever the IdP "
                             "or Redis do (default 30, at most 50: Kong gives up at 60)")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="event-loop processes sharing the socket, so that every core "
                             "Kong uses serves it (default: $OAUTH2_INTROSPECTION_PROCESSES, "
                             "else the CPUs this process may use; 1: one process, no "
                             "supervisor)")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads for blocking calls (IdP, Redis, Admin API; default 256)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log lines (never RPC messages: they hold tokens)")
    parser.add_argument("--no-lua-style", action="store_true",
                        help="accepted for kong-pdk compatibility; always on")
    parser.add_argument("-g", "--gevent", action="store_true",
                        help="accepted for kong-pdk compatibility: the server is always "
                             "event-driven")
    parser.add_argument("-m", "--multiprocessing", action="store_true",
                        help="refused: a process pool serves only as many events at once "
                             "as there are CPUs (see the README's 'Operations')")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus /metrics and /health on this loopback port "
                             "(0: any free port, logged; default: off)")
    parser.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDRESS",
                        help="loopback address for --metrics-port (default: %(default)s)")
    parser.add_argument("--otlp-endpoint", default=None, metavar="URL",
                        help="export OpenTelemetry spans over OTLP/HTTP to this URL (e.g. "
                             "http://127.0.0.1:4318/v1/traces); OTEL_EXPORTER_OTLP_ENDPOINT "
                             "also turns tracing on (default: off)")
    parser.add_argument("-dump", "--dump", action="store_true", help=argparse.SUPPRESS)
    return parser


def serve(argv: List[str]) -> int:
    args = _serve_parser().parse_args(argv)
    if args.dump:
        return _dump(args.plugin)
    processes = _processes(args.processes)
    if processes is None:
        return 2
    if processes > 1 and args.metrics_port is not None and os.path.isdir(args.prefix):
        _multiprocess_metrics(args.prefix, args.plugin)
    from .ops.log import LOG
    from .server.listener import (DEFAULT_DEADLINE, DEFAULT_WORKERS, MAX_DEADLINE, PluginServer,
                                  StartError)
    from .server.listener import serve as run
    if args.multiprocessing:
        _fail("-m is not supported: a process pool runs only as many events as there are "
              "CPUs, and under a slow IdP the rest wait past Kong's 60 s and pass "
              "unauthenticated. Run without it.")
        return 2
    deadline = DEFAULT_DEADLINE if args.deadline is None else args.deadline
    if not 1 <= deadline <= MAX_DEADLINE:
        _fail(f"--deadline must be between 1 and {MAX_DEADLINE:g} seconds")
        return 2
    workers = DEFAULT_WORKERS if args.workers is None else args.workers
    if workers < 1:
        _fail("--workers must be at least 1")
        return 2
    if not os.path.isdir(args.prefix):
        _fail(f"kong prefix {args.prefix!r} is not a directory")
        return 2
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        _fail("--metrics-port must be between 0 and 65535")
        return 2
    from .ops import metrics, tracing
    if not metrics.loopback(args.metrics_address):
        _fail(f"--metrics-address {args.metrics_address!r} is not a loopback address: "
              "metrics and health are served on this host only")
        return 2
    LOG.threshold = 10 if args.verbose else 20
    from .plugins import load
    plugin = load(args.plugin)
    socket_path = os.path.join(args.prefix, args.socket_name or args.plugin + ".sock")
    try:
        if processes == 1:
            server = PluginServer([plugin], deadline=deadline, workers=workers, log=LOG)
            _observe(args, server, LOG)
            run(socket_path, server, backlog=args.listen_queue_size)
        else:
            from .server.processes import Supervisor, node_directory

            def make_server(slot: int, table) -> PluginServer:
                # in the child, after the fork: threads, pools and ports are its own
                server = PluginServer([plugin], deadline=deadline, workers=workers, log=LOG,
                                      table=table, slot=slot)
                _observe(args, server, LOG, serve_metrics=slot == 0)
                return server
            supervisor = Supervisor(socket_path, node_directory(args.prefix, args.plugin),
                                    processes, make_server, LOG,
                                    backlog=args.listen_queue_size)
            supervisor.start()
            supervisor.run()
    except StartError as err:
        _fail(str(err))
        return 2
    finally:
        tracing.shutdown()
    return 0


def _processes(given: Optional[int]) -> Optional[int]:
    from .server.sizing import ENV, MAX_PROCESSES, default_processes
    where = "--processes"
    if given is None and os.environ.get(ENV, "").strip():
        where = ENV
        try:
            given = int(os.environ[ENV])
        except ValueError:
            given = 0
    count = default_processes() if given is None else given
    if not 1 <= count <= MAX_PROCESSES:
        _fail(f"{where} must be a whole number from 1 to {MAX_PROCESSES}")
        return None
    return count


def _multiprocess_metrics(prefix: str, plugin: str) -> None:
    """Every process counts into files that slot 0's /metrics sums (prometheus_client's
    multiprocess mode, chosen by this variable before prometheus_client is imported).
    A directory of this run's own: a second ``serve`` refused on the same prefix must
    not touch the first one's; the supervisor removes older runs' once it has the
    socket (processes.py)."""
    directory = os.path.join(prefix, plugin + ".node", "metrics", str(os.getpid()))
    try:
        os.makedirs(directory, mode=0o700)
    except OSError:
        return   # the metrics stay per process; serve reports the directory itself
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


def _observe(args: argparse.Namespace, server, log, serve_metrics: bool = True) -> None:
    """Metrics and tracing, when asked for. Failing to start either is logged and
    the server runs without it: refusing requests over telemetry would be worse.
    With several processes every one counts and only the first (slot 0) serves the
    port, with the sums of all of them."""
    from .ops import metrics, tracing
    if args.metrics_port is not None and not serve_metrics:
        metrics.enable(server)
    if args.metrics_port is not None and serve_metrics:
        try:
            _, port = metrics.serve_http(args.metrics_address, args.metrics_port, server)
        except OSError as err:
            log.err("metrics: cannot listen on %s:%d (%s); running without metrics"
                    % (args.metrics_address, args.metrics_port, err.strerror or err))
        else:
            metrics.enable(server)
            log.info("metrics: http://%s:%d/metrics and /health" % (args.metrics_address, port))
    endpoint = tracing.configured_endpoint(args.otlp_endpoint)
    if endpoint:
        try:
            tracing.enable(endpoint)
        except ImportError:
            log.err("tracing: the OpenTelemetry SDK is not installed (pip install "
                    "'kong-oauth2-introspection[tracing]'); running without traces")
        else:
            log.info("tracing: spans exported to %s" % metrics.endpoint_label(endpoint))


def _fail(message: str) -> None:
    print(f"{NAME}: {message}", file=sys.stderr)


def _delegate(name: str) -> Callable[[List[str]], int]:
    module, _ = _DELEGATED[name]

    def run(argv: List[str]) -> int:
        try:
            mod = importlib.import_module("." + module, __package__)
        except ImportError:
            _fail(f"{name} is not available in this build")
            return 2
        return mod.main(argv)
    return run


def _usage() -> str:
    lines = [f"usage: {PROG} [--version] COMMAND [ARGS]", "", "commands:",
             "  serve   run one plugin's server (Kong's start_cmd; --plugin NAME "
             "-kong-prefix DIR)",
             "  dump    print one plugin's info as Kong's query_cmd reads it (--plugin NAME)"]
    lines += [f"  {n:<7} {h}" for n, (_, h) in _DELEGATED.items()]
    lines += ["  docs    print the plugins' option tables, generated from their schemas", "",
              f"'{PROG} COMMAND --help' tells more."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(_usage(), file=sys.stdout if argv else sys.stderr)
            return 0 if argv else 2
        if argv[0] in ("--version", "-version", "version"):
            print(f"{PROG} {VERSION}")
            return 0
        command, rest = argv[0], argv[1:]
        if command.startswith("-"):  # kong-pdk's command line: serve, or -dump
            command, rest = "serve", argv
        commands: Dict[str, Callable[[List[str]], int]] = {"serve": serve, "dump": dump,
                                                           "docs": docs}
        commands.update({name: _delegate(name) for name in _DELEGATED})
        if command not in commands:
            _fail(f"unknown command {command!r}")
            print(_usage(), file=sys.stderr)
            return 2
        return commands[command](rest)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
