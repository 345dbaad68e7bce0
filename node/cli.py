"""The `libra-node` command line: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import structlog

from node.admin import AdminError
from node.admin_cli import add_admin_commands
from node.config import ConfigError, load_config, validate_ae_title
from node.index.schema import SchemaOutdatedError

log = structlog.get_logger(__name__)


def parse_peer(text: str) -> tuple[str, str, int]:
    """Parse 'AE@HOST:PORT' into (AE title, host, port).

    Raises
    ------
    argparse.ArgumentTypeError
        When the text does not have that form; the message shows an example.
    """
    try:
        ae_title, address = text.split("@", 1)
        host, port_text = address.rsplit(":", 1)
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1-65535")
        return validate_ae_title(ae_title), host, port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not AE@HOST:PORT (for example PACS@127.0.0.1:4242): {exc}") from exc


def _command_run(args: argparse.Namespace) -> int:
    from node.log_config import configure_logging
    from node.service import NodeService

    config = load_config(args.config)
    configure_logging(config.logging.format, config.logging.level)
    service = NodeService(config, run_worker=not args.no_worker, config_path=args.config)
    stop_requested = threading.Event()

    def request_stop(signal_number, frame):
        log.info("node.stop_requested", signal=signal.Signals(signal_number).name)
        stop_requested.set()

    def request_reload(signal_number, frame):
        log.info("node.reload_requested", signal=signal.Signals(signal_number).name)
        service.reload_config_logged()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    service.start()
    stop_requested.wait()
    service.stop()
    return 0


def _command_worker(args: argparse.Namespace) -> int:
    from node.log_config import configure_logging
    from node.service import WorkerService

    config = load_config(args.config)
    configure_logging(config.logging.format, config.logging.level)
    service = WorkerService(config)
    stop_requested = threading.Event()

    def request_stop(signal_number, frame):
        log.info("worker.stop_requested", signal=signal.Signals(signal_number).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    service.start()
    stop_requested.wait()
    service.stop()
    return 0


def _command_db(args: argparse.Namespace) -> int:
    from node.index import schema
    from node.index.session import IndexDatabase

    config = load_config(args.config)
    index = IndexDatabase(config.database_url)
    try:
        before = schema.current_revision(index.engine)
        if args.db_command == "upgrade":
            schema.upgrade(index.engine, args.revision)
        elif args.db_command == "downgrade":
            schema.downgrade(index.engine, args.revision)
        after = schema.current_revision(index.engine)
    finally:
        index.dispose()
    if args.db_command == "current":
        print(f"schema revision: {after or 'none'} (this node needs {schema.head_revision()})")
    else:
        print(f"schema revision: {before or 'none'} -> {after or 'none'}")
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(workdir=args.workdir, input_dir=args.input, timeout_seconds=args.timeout)


def _command_echo(args: argparse.Namespace) -> int:
    from node.sender import echo

    ae_title, host, port = args.peer
    started = time.monotonic()
    status = echo(host, port, ae_title, args.calling_ae_title, timeout_seconds=args.timeout)
    elapsed_ms = (time.monotonic() - started) * 1000
    if status is None:
        print(f"C-ECHO to {ae_title}@{host}:{port} failed: no association (rejected, refused or timed out)")
        return 1
    print(f"C-ECHO to {ae_title}@{host}:{port}: status 0x{status:04X} in {elapsed_ms:.1f} ms")
    return 0 if status == 0 else 1


def _command_send(args: argparse.Namespace) -> int:
    from node.send_tool import send_files

    ae_title, host, port = args.peer
    return send_files(ae_title, host, port, args.files, calling_ae_title=args.calling_ae_title)


def _command_ae_test_query(args: argparse.Namespace) -> int:
    from node.query_retrieve import check_query_source

    config = load_config(args.config)
    sources = {source.name: source for source in config.query_sources}
    if args.name not in sources:
        configured = ", ".join(sorted(sources)) or "none"
        raise ConfigError(
            f"query source {args.name!r} is not in {args.config}; configured [[query_sources]] names: {configured}"
        )
    source = sources[args.name]
    print(f"Checking query source {source.name} ({source.ae_title}@{source.host}:{source.port}) as {config.node.ae_title}")
    checks = check_query_source(source, config.node.ae_title)
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.request:<7} {check.detail}")
    return 0 if all(check.passed for check in checks) else 1


def _command_sr_show(args: argparse.Namespace) -> int:
    import pydicom

    from node.sr_show import format_sr_tree

    print(format_sr_tree(pydicom.dcmread(args.file)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="libra-node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the node: receiver, timer, worker and sender")
    run.add_argument("--config", type=Path, default=Path("config/node.toml"), help="TOML configuration file (default: %(default)s)")
    run.add_argument("--no-worker", action="store_true", help="receive, route and send only; report jobs run elsewhere")
    run.set_defaults(handler=_command_run)

    worker = commands.add_parser("worker", help="run report jobs only (with a shared index and store)")
    worker.add_argument("--config", type=Path, default=Path("config/node.toml"), help="TOML configuration file (default: %(default)s)")
    worker.set_defaults(handler=_command_worker)

    db = commands.add_parser("db", help="manage the index database schema (Alembic migrations)")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    for name, help_text, default_revision in (
        ("upgrade", "apply pending migrations", "head"),
        ("downgrade", "revert migrations (back up the database first)", "-1"),
        ("current", "print the database's schema revision", None),
    ):
        db_command = db_commands.add_parser(name, help=help_text)
        db_command.add_argument("--config", type=Path, default=Path("config/node.toml"), help="TOML configuration file (default: %(default)s)")
        if default_revision is not None:
            db_command.add_argument("revision", nargs="?", default=default_revision, help="target revision (default: %(default)s)")
        db_command.set_defaults(handler=_command_db)

    demo = commands.add_parser("demo", help="send synthetic studies through a local node to a local PACS and show the SR")
    demo.add_argument("--input", type=Path, help="send the DICOM files in this folder instead of synthetic studies")
    demo.add_argument("--workdir", type=Path, default=Path("var/demo"), help="folder for the demo's node and PACS (default: %(default)s; emptied first)")
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the SR (default: %(default)s)")
    demo.set_defaults(handler=_command_demo)

    echo = commands.add_parser("echo", help="send a C-ECHO to a DICOM peer")
    echo.add_argument("peer", type=parse_peer, help="AE@HOST:PORT")
    echo.add_argument("--calling-ae-title", type=validate_ae_title, default="LIBRA_NODE", help="our AE title (default: %(default)s)")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default: %(default)s)")
    echo.set_defaults(handler=_command_echo)

    send = commands.add_parser("send", help="send DICOM files to a peer with C-STORE")
    send.add_argument("peer", type=parse_peer, help="AE@HOST:PORT")
    send.add_argument("files", type=Path, nargs="+", help="DICOM files or folders")
    send.add_argument("--calling-ae-title", type=validate_ae_title, default="LIBRA_NODE", help="our AE title (default: %(default)s)")
    send.set_defaults(handler=_command_send)

    sr = commands.add_parser("sr", help="inspect structured reports")
    sr_commands = sr.add_subparsers(dest="sr_command", required=True)
    sr_show = sr_commands.add_parser("show", help="print an SR file's attributes and content tree")
    sr_show.add_argument("file", type=Path)
    sr_show.set_defaults(handler=_command_sr_show)

    ae_commands = add_admin_commands(commands)
    ae_test_query = ae_commands.add_parser(
        "test-query", help="check that a [[query_sources]] PACS allows C-ECHO, C-FIND and its retrieve method"
    )
    ae_test_query.add_argument("name", help="the name of the [[query_sources]] entry")
    ae_test_query.add_argument("--config", type=Path, default=Path("config/node.toml"), help="TOML configuration file (default: %(default)s)")
    ae_test_query.set_defaults(handler=_command_ae_test_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `libra-node` command and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"libra-node: {exc}", file=sys.stderr)
        return 2
    except SchemaOutdatedError as exc:
        print(f"libra-node: {exc}", file=sys.stderr)
        return 2
    except AdminError as exc:
        print(f"libra-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
