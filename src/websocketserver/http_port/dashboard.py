"""The dashboard (``/v1/status_view``): an operator's page of the ``/v1/status`` document.

In a cluster it says which instance serves it, labels this instance's figures ("this
node") apart from the cluster's ("cluster: 1 of 6 in use") and has a node column; a
tunnel's bytes on another instance are what that instance last wrote into the store
(at most 5 s old). The administrator also sees each session's client address, backend
and process. Reserving from the page shows where to use the reservation: the
websocket URL for a client and, for an RFB service whose noVNC pages are served here,
a link that opens it; unused, ``--timeout`` reclaims it as any other.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class View:
    """Who looks, from where: ``node`` (this instance's name in a cluster, else
    empty), ``admin`` (the security token's holder), ``ws_port`` (the websocket port,
    -1: none) and ``novnc`` (the services whose reservations noVNC's page here opens)."""

    node: str = ""
    admin: bool = False
    ws_port: int = -1
    novnc: frozenset[str] = frozenset()


def render_overview(figures: dict[str, Any], view: View = View()) -> str:
    """The dashboard's head: version, uptime, tunnels (basic mode ones included), bytes;
    in a cluster, labelled as this instance's."""
    scope = (f"<span class='scope'>this node ({html.escape(view.node)}):</span>"
             if view.node else "")
    return (
        f"<p class='overview'>{scope}"
        f"<span>version <b>{html.escape(str(figures['version']))}</b></span>"
        f"<span>up <b>{_age(figures['uptime'])}</b></span>"
        f"<span>tunnels open <b>{figures['tunnels_open']:.0f}</b> "
        "<small>(basic mode and reserved)</small></span>"
        f"<span>tunnels since start <b>{figures['tunnels_total']:.0f}</b></span>"
        f"<span>bytes down <b>{_bytes(figures['bytes_down'])}</b></span>"
        f"<span>bytes up <b>{_bytes(figures['bytes_up'])}</b></span></p>"
    )


def _columns(view: View) -> list[str]:
    return ["index", *(["node"] if view.node else []), "state", "owner", "age",
            "bytes down", "bytes up",
            *(["client", "backend", "process"] if view.admin else []),
            "options", "token", ""]


def _row(instance: dict[str, Any], view: View, now: float) -> str:
    node = (f"<td>{html.escape(str(instance.get('node') or ''))}</td>" if view.node
            else "")
    admin = "".join(f"<td>{html.escape(str(instance.get(key) or '–'))}</td>"
                    for key in ("client", "backend", "pid")) if view.admin else ""
    return (f"<tr><td>{instance['index']}</td>{node}<td>{_state_cell(instance)}</td>"
            f"<td>{html.escape(instance['owner'] or 'anonymous')}</td>"
            f"<td>{_age(now - instance['timestamp'])}</td>"
            f"<td class='num'>{_bytes(instance['bytes_down'])}</td>"
            f"<td class='num'>{_bytes(instance['bytes_up'])}</td>{admin}"
            f"<td><code>{html.escape(json.dumps(instance['options']))}</code></td>"
            f"{_token_cells(instance['token'])}</tr>")


def render_services(services: list[dict[str, Any]], view: View = View()) -> str:
    """The dashboard's body: a card per service with its instances."""
    now = time.time()
    columns = _columns(view)
    blocks = []
    for service in services:
        name = html.escape(service["name"])
        rows = "".join(_row(i, view, now) for i in service["instances"]) or (
            f"<tr><td colspan='{len(columns)}' class='idle'>no instances</td></tr>")
        used, count = len(service["instances"]), service["count"]
        novnc = " data-novnc='1'" if service["name"] in view.novnc else ""
        reserve = (f"<button data-reserve='{name}'{novnc}>reserve</button>" if used < count
                   else "<span class='full'>all in use</span>")
        options = html.escape(json.dumps(service["common_options"]))
        in_use = f"{'cluster: ' if view.node else ''}{used} of {count} in use"
        heads = "".join(f"<th>{column}</th>" for column in columns)
        blocks.append(
            f"<section><h2>{name} <small>{in_use}</small> {reserve}</h2>"
            f"<p class='options'>common options: <code>{options}</code></p><table>"
            f"<tr>{heads}</tr>{rows}</table></section>"
        )
    return "".join(blocks) or "<p class='idle'>No services are configured.</p>"


def _state_cell(instance: dict[str, Any]) -> str:
    """The state chip; a detached instance's also says how long it is kept, a reserved
    one's how long until it is reclaimed unused (``--timeout``)."""
    state = html.escape(instance["state"])
    left = instance.get("detached_seconds_left")
    until = f" <small>{left:.0f} s left</small>" if left is not None else ""
    reclaim = instance.get("reclaim_seconds_left")
    if reclaim is not None:
        until = f" <small>reclaimed in {_age(reclaim)} unless used</small>"
    return (f"<span class='state {state}'>{state}</span>{until}{_job(instance)}"
            f"{_viewers(instance)}")


def _viewers(instance: dict[str, Any]) -> str:
    """The viewers of the instance's shares: how many, their modes and users."""
    viewers = instance.get("viewers") or []
    if not viewers:
        return ""
    who = ", ".join(f"{v['mode']}: {v['user'] or 'anonymous'}" for v in viewers)
    return (f" <small class='viewers'>{len(viewers)} viewer{'s' if len(viewers) > 1 else ''}"
            f" ({html.escape(who)})</small>")


def _job(instance: dict[str, Any]) -> str:
    """A Slurm job's id, and why it waits (with its expected start) or where it runs."""
    if instance.get("job_id") is None:
        return ""
    text = f"job {instance['job_id']}"
    if instance.get("job_node"):
        text += f" on {instance['job_node']}"
    elif instance.get("queue_reason"):
        text += f": {instance['queue_reason']}"
        if instance.get("expected_start"):
            text += f", expected {instance['expected_start']}"
    return f" <small class='job'>{html.escape(text)}</small>"


def _token_cells(token: str | None) -> str:
    """The token and release cells of an instance; empty for another user's token."""
    if token is None:
        return "<td class='idle'>another user's</td><td></td>"
    token = html.escape(token)
    return (f"<td><code title='{token}'>{token[:8]}…</code></td>"
            f"<td><button data-release='{token}'>release</button></td>")


_DASHBOARD_SCRIPT = """
const params = new URLSearchParams(location.search);
const auth = new URLSearchParams();
for (const name of ['security_token', 'user_key']) {
  if (params.get(name)) auth.set(name, params.get(name));
}
const withAuth = (path) => auth.size ? `${path}?${auth}` : path;
async function refresh() {
  const url = new URL(location.href);
  url.searchParams.set('fragment', '1');
  try {
    const response = await fetch(url);
    if (response.ok) {
      document.getElementById('services').innerHTML = await response.text();
      document.getElementById('updated').textContent =
        'updated ' + new Date().toLocaleTimeString();
    }
  } catch (error) {
    document.getElementById('updated').textContent = 'server unreachable';
  }
}
function reserved(service, novnc, answer) {
  const notice = document.getElementById('reserved');
  if (!answer.token) {
    notice.textContent = `${service}: ${answer.error}`;
    return;
  }
  const port = document.body.dataset.wsPort;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const url = `${scheme}://${location.hostname}:${port}/?token=${answer.token}`;
  const code = document.createElement('code');
  code.textContent = port ? url : answer.token;
  notice.replaceChildren(`${service} reserved: `, port ? 'its client connects to ' : 'token ',
                         code);
  if (novnc && port) {
    const link = document.createElement('a');
    link.href = '/vnc.html?' + new URLSearchParams({host: location.hostname, port,
      path: `websockify?token=${answer.token}`, autoconnect: 'true'});
    link.target = '_blank';
    link.textContent = 'open it in noVNC';
    notice.append(' or ', link);
  }
  notice.append(' (unused, it is reclaimed after --timeout)');
}
document.addEventListener('click', async (event) => {
  const reserve = event.target.dataset.reserve, release = event.target.dataset.release;
  if (reserve) {
    const response = await fetch(withAuth(`/v1/reserve/${encodeURIComponent(reserve)}`));
    reserved(reserve, event.target.dataset.novnc === '1', await response.json());
  }
  if (release) await fetch(withAuth(`/v1/release/${encodeURIComponent(release)}`));
  if (reserve || release) refresh();
});
setInterval(refresh, 2000);
"""


def render_status(services: list[dict[str, Any]], overview: str = "",
                  view: View = View()) -> str:
    """``/v1/status_view``: the status as a live dashboard (refreshes every 2 s), under
    the server-wide ``overview``."""
    served = f" <small>served by {html.escape(view.node)}</small>" if view.node else ""
    ws_port = f" data-ws-port='{view.ws_port}'" if view.ws_port > 0 else ""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>websocketserver status</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}"
        "section{background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em 1.5em;"
        "margin-bottom:1.5em}h2{margin:0 0 .3em}small{color:#666;font-weight:normal;"
        "font-size:.7em}table{border-collapse:collapse;width:100%}td,th{border-bottom:1px "
        "solid #eee;padding:.35em .8em;text-align:left}th{color:#555;font-weight:600}"
        ".num{text-align:right;font-variant-numeric:tabular-nums}.state{padding:.1em .5em;"
        "border-radius:1em;background:#eee}.active{background:#d7f5dc;color:#075}"
        ".starting{background:#fff1c9;color:#850}.stopping{background:#fde0e0;color:#a00}"
        ".reserved{background:#e3ecff;color:#248}.queued{background:#ffe6cc;color:#940}"
        ".detached{background:#efe2ff;color:#63a}.scope{font-weight:600}"
        ".idle,.options,#updated{color:#888}.overview span{margin-right:1.5em}"
        "#reserved:empty{display:none}#reserved{background:#e3ecff;padding:.5em 1em;"
        "border-radius:6px}.full{font-size:.6em;color:#a00}button{cursor:pointer}</style>"
        f"</head><body{ws_port}><h1>websocketserver status{served}</h1>"
        "<p id='updated'></p><p id='reserved'></p>"
        f"<main id='services'>{overview}{render_services(services, view)}</main>"
        f"<script>{_DASHBOARD_SCRIPT}</script></body></html>"
    )


def _bytes(count: float) -> str:
    exponent = 0
    while count >= 1024 and exponent < 3:
        count /= 1024
        exponent += 1
    return f"{count:,.0f} B" if exponent == 0 else f"{count:,.1f} {'KMG'[exponent - 1]}iB"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
