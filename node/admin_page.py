"""The admin status page: server-rendered HTML of the status counts, recent studies and outbox.

Every value from the index passes through `html.escape`. The page's script and style are
separate resources, so the page works under a Content Security Policy without inline code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from html import escape

from node.admin import OutboxSummary, StudySummary

# Studies in these states can be requeued; the others are still in progress.
REQUEUE_STATES = frozenset({"reported", "sent", "failed", "skipped"})

STATUS_SCRIPT = """\
"use strict";
// Requeue buttons: POST to the admin API, then show the result in the row and the message line.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button.requeue");
  if (!button) {
    return;
  }
  const message = document.getElementById("message");
  const row = button.closest("tr");
  const uid = button.dataset.studyInstanceUid;
  button.disabled = true;
  let succeeded = false;
  try {
    const response = await fetch("api/studies/" + encodeURIComponent(uid) + "/requeue", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: "{}",
      credentials: "same-origin",
    });
    const body = await response.json();
    succeeded = response.ok;
    if (succeeded) {
      row.querySelector(".state").textContent = body.state;
      message.textContent = body.message;
    } else {
      message.textContent = "Requeue failed: " + body.error;
    }
  } catch (error) {
    message.textContent = "Requeue failed: " + error;
  } finally {
    button.disabled = succeeded;
    message.dataset.outcome = succeeded ? "ok" : "error";
  }
});
"""

STATUS_STYLE = """\
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1b1b1b; }
h1 { font-size: 1.3rem; }
h2 { font-size: 1.1rem; margin-top: 1.5rem; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #c8c8c8; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #efefef; }
td.uid { font-family: ui-monospace, monospace; font-size: 0.8rem; }
#message { min-height: 1.2rem; font-weight: 600; }
#message[data-outcome="error"] { color: #a00000; }
"""


def _format_time(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _table(headers: Sequence[str], rows: Iterable[str], table_id: str) -> str:
    header_cells = "".join(f"<th>{escape(header)}</th>" for header in headers)
    body = "\n".join(rows) or f'<tr><td colspan="{len(headers)}">none</td></tr>'
    return f'<table id="{table_id}">\n<thead><tr>{header_cells}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def _study_row(study: StudySummary) -> str:
    uid = escape(study.study_instance_uid)
    button = ""
    if study.state in REQUEUE_STATES:
        button = f'<button type="button" class="requeue" data-study-instance-uid="{uid}">Requeue</button>'
    cells = [
        f'<td class="uid">{uid}</td>',
        f"<td>{escape(study.patient_hash)}</td>",
        f"<td>{escape(_format_time(study.received_at))}</td>",
        f"<td>{study.instance_count}</td>",
        f'<td class="state">{escape(study.state)}</td>',
        f"<td>{escape(study.state_reason)}</td>",
        f'<td class="uid">{"<br>".join(escape(uid) for uid in study.sr_sop_instance_uids)}</td>',
        f"<td>{button}</td>",
    ]
    return f'<tr data-study-instance-uid="{uid}">{"".join(cells)}</tr>'


def _outbox_row(entry: OutboxSummary) -> str:
    status = f"0x{entry.last_status:04X}" if entry.last_status is not None else ""
    cells = [
        f"<td>{entry.outbox_id}</td>",
        f'<td class="uid">{escape(entry.sr_sop_instance_uid)}</td>',
        f'<td class="uid">{escape(entry.study_instance_uid)}</td>',
        f"<td>{escape(entry.destination)}</td>",
        f"<td>{escape(entry.state)}</td>",
        f"<td>{entry.attempts}</td>",
        f"<td>{escape(_format_time(entry.sent_at or entry.next_attempt_at))}</td>",
        f"<td>{escape(status)}</td>",
        f"<td>{escape(entry.last_error)}</td>",
    ]
    return f"<tr>{''.join(cells)}</tr>"


def render_status_page(
    ae_title: str,
    counts: dict[str, int],
    studies: Sequence[StudySummary],
    outbox: Sequence[OutboxSummary],
    now: dt.datetime,
) -> str:
    """Return the status page as an HTML document."""
    count_cells = "".join(f"<td>{count}</td>" for count in counts.values())
    count_table = (
        '<table id="counts">\n<thead><tr>'
        + "".join(f"<th>{escape(state)}</th>" for state in counts)
        + f"</tr></thead>\n<tbody><tr>{count_cells}</tr></tbody>\n</table>"
    )
    studies_table = _table(
        ["Study Instance UID", "Patient hash", "Received", "Images", "State", "Reason", "SR SOP Instance UID", ""],
        (_study_row(study) for study in studies),
        "studies",
    )
    outbox_table = _table(
        ["Outbox", "SR SOP Instance UID", "Study Instance UID", "Destination", "State", "Attempts",
         "Sent or next attempt", "Last status", "Last error"],
        (_outbox_row(entry) for entry in outbox),
        "outbox",
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>libra-node {escape(ae_title)}</title>
<link rel="stylesheet" href="static/status.css">
<script src="static/status.js" defer></script>
</head>
<body>
<h1>libra-node {escape(ae_title)}</h1>
<p>As of {escape(_format_time(now))}. <a href="">Reload</a> &middot; <a href="metrics">Metrics</a> &middot;
<a href="healthz">Health</a></p>
<p id="message" role="status"></p>
<h2>Studies by state</h2>
{count_table}
<h2>Recent studies</h2>
{studies_table}
<h2>Recent outbox entries</h2>
{outbox_table}
</body>
</html>
"""
