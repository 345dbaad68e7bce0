"""Admin subcommands of `libra-node`: ae, status, studies, requeue and resend.

They work on the configuration file and the index directly, so they work whether or not a node
is running. A running node picks up requeued jobs and resent SRs from the index. After an AE
change the command asks a running node on this machine to reload through its admin endpoint,
which SIGHUP also does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from node import admin, ae_config
from node.config import NodeConfig, SRClass, load_config

_CONFIG_HELP = "TOML configuration file (default: %(default)s)"
_DEFAULT_CONFIG = Path("config/node.toml")


def _actor() -> str:
    """Return the audit actor of this command: admin:<login name>."""
    try:
        return f"admin:{getpass.getuser()}"
    except (KeyError, OSError):
        return "admin:cli"


def _logged_to_stderr(handler):
    """Wrap a command so that log lines go to standard error as text, warnings and errors only.

    Standard output then holds only the command's table or JSON.
    """

    def run(args: argparse.Namespace) -> int:
        from node.log_config import configure_logging

        configure_logging("console", "warning")
        return handler(args)

    return run


def _open_index(config: NodeConfig):
    from node.index.session import IndexDatabase

    index = IndexDatabase(config.database_url)
    index.prepare_schema(create_if_empty=False)
    return index


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Return rows as a plain text table with aligned columns."""
    text_rows = [[("" if value is None else str(value)) for value in row] for row in rows]
    widths = [max([len(header), *(len(row[column]) for row in text_rows)]) for column, header in enumerate(headers)]
    lines = ["  ".join(header.ljust(width) for header, width in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in text_rows)
    return "\n".join(lines)


def _format_time(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if value else ""


def _print_json(value) -> None:
    print(json.dumps(value, indent=1))


# -- ae ----------------------------------------------------------------------------------------


def _reload_running_node(config: NodeConfig) -> str:
    """Ask a node on this machine to reload through its admin endpoint; return what happened."""
    settings = config.admin
    if not settings.enabled or settings.port == 0:
        return "No admin endpoint is configured: send SIGHUP to the running node to apply the change."
    host = "127.0.0.1" if settings.bind_address in ("0.0.0.0", "127.0.0.1") else settings.bind_address
    if ":" in host:
        host = "[::1]" if host == "::" else f"[{host}]"
    request = urllib.request.Request(
        f"http://{host}:{settings.port}/api/reload", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
    )
    token = settings.token.get_secret_value()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            json.loads(response.read())
        return "The running node reloaded its callers and destinations."
    except urllib.error.HTTPError as exc:
        return f"The running node did not reload (HTTP {exc.code}: {exc.read().decode(errors='replace').strip()})."
    except (urllib.error.URLError, OSError):
        return "No node answered on the admin endpoint; a node started later reads the file as it is now."


def _after_edit(args: argparse.Namespace, message: str) -> None:
    print(message)
    if args.no_reload:
        print("Not reloaded (--no-reload): send SIGHUP to the running node or POST /api/reload to apply the change.")
    else:
        print(_reload_running_node(load_config(args.config)))


def _command_ae_list(args: argparse.Namespace) -> int:
    callers, destinations = ae_config.load_entries(args.config)
    if args.json:
        _print_json(
            {
                "callers": [caller.model_dump() for caller in callers],
                "destinations": [destination.model_dump(mode="json") for destination in destinations],
            }
        )
        return 0
    print("Calling AE titles allowed to store:" if callers else "Calling AE titles: none listed, so every caller may store")
    if callers:
        print(format_table(["AE title", "host"], [(caller.ae_title, caller.host or "any") for caller in callers]))
    print()
    print("Destinations:" if destinations else "Destinations: none")
    if destinations:
        print(
            format_table(
                ["name", "AE title", "host", "port", "SR class"],
                [(item.name, item.ae_title, item.host, item.port, item.sr_class.value) for item in destinations],
            )
        )
    return 0


def _command_ae_add_caller(args: argparse.Namespace) -> int:
    caller = ae_config.add_caller(args.config, args.ae_title, args.host)
    where = f" from {caller.host}" if caller.host else " from any host"
    _after_edit(args, f"Calling AE title {caller.ae_title}{where} added to {args.config}.")
    return 0


def _command_ae_add_destination(args: argparse.Namespace) -> int:
    ae_title, host, port = args.peer
    destination = ae_config.make_destination(
        {"name": args.name, "ae_title": ae_title, "host": host, "port": port, "sr_class": args.sr_class}
    )
    ae_config.add_destination(args.config, destination)
    _after_edit(args, f"Destination {destination.name} ({ae_title}@{host}:{port}) added to {args.config}.")
    return 0


def _command_ae_remove_caller(args: argparse.Namespace) -> int:
    removed = ae_config.remove_caller(args.config, args.ae_title, host=args.host, allow_any_caller=args.allow_any_caller)
    _after_edit(args, f"Removed {removed} [[callers]] entry(ies) of {args.ae_title} from {args.config}.")
    return 0


def _command_ae_remove_destination(args: argparse.Namespace) -> int:
    ae_config.remove_destination(args.config, args.name)
    _after_edit(args, f"Destination {args.name} removed from {args.config}.")
    return 0


def _command_ae_test(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    destination = next((item for item in config.destinations if item.name == args.name), None)
    if destination is None:
        configured = ", ".join(item.name for item in config.destinations) or "none"
        print(f"libra-node: destination {args.name!r} is not configured (configured: {configured})", file=sys.stderr)
        return 2
    result = ae_config.echo_destination(destination, config.node.ae_title, timeout_seconds=args.timeout)
    if args.json:
        _print_json(result.as_dict())
    elif result.status is None:
        print(
            f"C-ECHO to {destination.name} ({destination.ae_title}@{destination.host}:{destination.port}) failed: "
            f"no association (rejected, refused or timed out) after {result.round_trip_ms:.1f} ms"
        )
    else:
        outcome = "succeeded" if result.succeeded else "failed"
        print(
            f"C-ECHO to {destination.name} ({destination.ae_title}@{destination.host}:{destination.port}) {outcome}: "
            f"status 0x{result.status:04X}, round trip {result.round_trip_ms:.1f} ms"
        )
    return 0 if result.succeeded else 1


# -- status, studies, requeue, resend ---------------------------------------------------------


def _command_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    index = _open_index(config)
    try:
        counts = admin.status_counts(index)
        depths = admin.queue_depths(index)
    finally:
        index.dispose()
    if args.json:
        _print_json({"studies": counts, **depths})
        return 0
    print(format_table(["state", "studies"], list(counts.items())))
    print()
    print(format_table(["queue", *depths["report_jobs"]], [["report jobs", *depths["report_jobs"].values()]]))
    print()
    print(format_table(["queue", *depths["outbox"]], [["outbox", *depths["outbox"].values()]]))
    return 0


def _command_studies(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    index = _open_index(config)
    try:
        if args.audit:
            rows = admin.study_audit(index, args.audit)
            if args.json:
                _print_json([row.as_dict() for row in rows])
            else:
                print(
                    format_table(
                        ["time", "entity", "id", "from", "to", "actor", "reason"],
                        [
                            (_format_time(row.occurred_at), row.entity, row.entity_id, row.from_state or "-",
                             row.to_state, row.actor, row.reason)
                            for row in rows
                        ],
                    )
                )
            return 0
        since = admin.parse_since(args.since) if args.since else None
        studies = admin.list_studies(index, state=args.state, since=since, limit=args.limit)
    finally:
        index.dispose()
    if args.json:
        _print_json([study.as_dict() for study in studies])
        return 0
    print(
        format_table(
            ["Study Instance UID", "patient hash", "received", "images", "state", "reason", "SR SOP Instance UID"],
            [
                (study.study_instance_uid, study.patient_hash, _format_time(study.received_at), study.instance_count,
                 study.state, study.state_reason, ",".join(study.sr_sop_instance_uids))
                for study in studies
            ],
        )
    )
    return 0


def _command_requeue(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    index = _open_index(config)
    try:
        result = admin.requeue_study(index, args.study_instance_uid, _actor())
    finally:
        index.dispose()
    if args.json:
        _print_json(asdict(result))
    else:
        print(result.message)
    return 0


def _command_resend(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    index = _open_index(config)
    try:
        results = admin.resend_sr(index, args.sr_sop_instance_uid, config.destinations, _actor(), to=args.to)
    finally:
        index.dispose()
    if args.json:
        _print_json([asdict(result) for result in results])
        return 0
    for result in results:
        if result.action == "queued":
            print(f"SR {result.sr_sop_instance_uid} queued for delivery to {result.destination} (outbox {result.outbox_id})")
        else:
            print(f"SR {result.sr_sop_instance_uid} is already waiting for delivery to {result.destination}")
    return 0


# -- parser ------------------------------------------------------------------------------------


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=_DEFAULT_CONFIG, help=_CONFIG_HELP)


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_no_reload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-reload", action="store_true", help="only edit the file; do not ask a running node to reload"
    )


def add_admin_commands(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ae, status, studies, requeue and resend subcommands to the `libra-node` parser.

    Returns the subcommands of `ae`, so that other modules can add their own checks to it.
    """
    from node.cli import parse_peer

    ae = commands.add_parser("ae", help="list, add, remove and test calling AE titles and destinations")
    ae_commands = ae.add_subparsers(dest="ae_command", required=True)

    ae_list = ae_commands.add_parser("list", help="print the allowed calling AE titles and the destinations")
    _add_config(ae_list)
    _add_json(ae_list)
    ae_list.set_defaults(handler=_logged_to_stderr(_command_ae_list))

    ae_add = ae_commands.add_parser("add", help="allow a calling AE title or add a destination")
    ae_add_kinds = ae_add.add_subparsers(dest="ae_kind", required=True)
    add_caller = ae_add_kinds.add_parser("caller", help="allow a calling AE title to store")
    add_caller.add_argument("ae_title", help="calling AE title (1 to 16 characters)")
    add_caller.add_argument("--host", default="", help="accept the title only from this peer address (default: any)")
    _add_config(add_caller)
    _add_no_reload(add_caller)
    add_caller.set_defaults(handler=_logged_to_stderr(_command_ae_add_caller))
    add_destination = ae_add_kinds.add_parser("destination", help="add a PACS that receives the draft SRs")
    add_destination.add_argument("name", help="destination name (letters, digits, _ . -)")
    add_destination.add_argument("peer", type=parse_peer, help="AE@HOST:PORT, for example PACS@10.0.0.5:104")
    add_destination.add_argument(
        "--sr-class",
        choices=[sr_class.value for sr_class in SRClass],
        default=SRClass.ENHANCED.value,
        help="SR class the destination receives (default: %(default)s)",
    )
    _add_config(add_destination)
    _add_no_reload(add_destination)
    add_destination.set_defaults(handler=_logged_to_stderr(_command_ae_add_destination))

    ae_remove = ae_commands.add_parser("remove", help="remove a calling AE title or a destination")
    ae_remove_kinds = ae_remove.add_subparsers(dest="ae_kind", required=True)
    remove_caller = ae_remove_kinds.add_parser("caller", help="stop accepting a calling AE title")
    remove_caller.add_argument("ae_title", help="calling AE title")
    remove_caller.add_argument("--host", default=None, help="remove only the entry bound to this host (default: all)")
    remove_caller.add_argument(
        "--allow-any-caller",
        action="store_true",
        help="allow removing the last entry, after which every calling AE title may store",
    )
    _add_config(remove_caller)
    _add_no_reload(remove_caller)
    remove_caller.set_defaults(handler=_logged_to_stderr(_command_ae_remove_caller))
    remove_destination = ae_remove_kinds.add_parser("destination", help="stop sending SRs to a destination")
    remove_destination.add_argument("name", help="destination name")
    _add_config(remove_destination)
    _add_no_reload(remove_destination)
    remove_destination.set_defaults(handler=_logged_to_stderr(_command_ae_remove_destination))

    ae_test = ae_commands.add_parser("test", help="send a C-ECHO to a destination and print the round-trip time")
    ae_test.add_argument("name", help="destination name")
    ae_test.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: the destination's timeout_seconds)")
    _add_config(ae_test)
    _add_json(ae_test)
    ae_test.set_defaults(handler=_logged_to_stderr(_command_ae_test))

    status = commands.add_parser("status", help="count studies per state and print the queue depths")
    _add_config(status)
    _add_json(status)
    status.set_defaults(handler=_logged_to_stderr(_command_status))

    studies = commands.add_parser("studies", help="list studies, or print one study's audit trail")
    studies.add_argument("--state", choices=admin.DISPLAY_STATES, help="only studies in this state")
    studies.add_argument("--since", help="only studies received since: an age (30m, 24h, 7d) or an ISO date or time in UTC")
    studies.add_argument("--limit", type=int, default=100, help="maximum number of studies (default: %(default)s)")
    studies.add_argument("--audit", metavar="STUDY_UID", help="print the audit trail of this study instead")
    _add_config(studies)
    _add_json(studies)
    studies.set_defaults(handler=_logged_to_stderr(_command_studies))

    requeue = commands.add_parser("requeue", help="queue a new report for a study (a new SR version)")
    requeue.add_argument("study_instance_uid", metavar="STUDY_UID", help="Study Instance UID")
    _add_config(requeue)
    _add_json(requeue)
    requeue.set_defaults(handler=_logged_to_stderr(_command_requeue))

    resend = commands.add_parser("resend", help="deliver an existing SR again")
    resend.add_argument("sr_sop_instance_uid", metavar="SR_UID", help="SOP Instance UID of the SR")
    resend.add_argument("--to", metavar="NAME", help="only this destination (default: every destination of the SR's class)")
    _add_config(resend)
    _add_json(resend)
    resend.set_defaults(handler=_logged_to_stderr(_command_resend))
    return ae_commands
