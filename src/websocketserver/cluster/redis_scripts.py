"""The Redis store's data and the Lua scripts that keep it (``lua/*.lua``).

Every change is one script run by Redis (atomic: Redis runs one script at a time),
every time in it is Redis's ``TIME``, and the lifecycle table the scripts enforce is
:mod:`.lifecycle`'s, filled into ``lua/head.lua`` with this module's constants.

Data, under a key prefix (``websocketserver:`` by default):

* ``nodes`` (hash): instance name -> JSON ``{name, epoch, address, counts, ttl, seen,
  rid}``; ``seen`` is when it last beat (Redis milliseconds), ``counts`` its services'
  counts, ``ttl`` its heartbeat TTL (each instance is judged by its own);
* ``res`` (hash): token -> JSON reservation ``{token, service, scope, node, index, state,
  owner, options, timestamp, changed, by, op, ran, job}``; ``by`` is the instance that
  made the last change, ``op`` that change's id (a retried call is recognised), ``ran``
  whether it was ever claimed, ``job`` a Slurm service's job record, ``shares`` its
  share tokens, ``figures`` what its session carried (JSON text, written by its
  instance at most every 5 s);
* ``used`` (hash): ``node<TAB>service`` -> JSON ``{index: token}``, the slots that
  node's reservations of that service hold, changed in the same scripts as ``res`` so
  that placing a reservation decodes no reservation (built from ``res`` by the first
  registration that finds it missing: every instance of a cluster must run a version
  that keeps it);
* ``idle`` (sorted set): the tokens of never-used (reserved) reservations, scored by
  when they last changed, so that reclaiming reads only the expired ones;
* ``ended`` (hash) and ``ended_at`` (sorted set): reservations that ended, with their
  ``end_reason``, readable for :data:`~.lifecycle.ENDED_KEPT` seconds (the reclaim script
  forgets older ones);
* ``stops:<node>`` (hash): token -> token, the sessions of ``node`` that another
  instance moved to stopping and that still exist (what the stop scan reads);
* ``jobs`` (hash): Slurm job id -> token, for the live reservations with a job (a job's
  report may reach any instance);
* ``shares`` (hash): share token -> token (``/v1/share/{token}``), for the live
  reservations, each of which lists its own in ``shares`` (share token -> mode);
* ``adopt:<node>`` (hash): token -> token, sessions with a Slurm job that the eviction
  of a dead instance moved to ``node``, which takes them (``adopted``) and follows
  their jobs: a job is the cluster's, not its instance's;
* ``meta`` (hash): ``epoch`` (the registration counter), ``contact`` (when an instance
  last reached Redis), ``used`` and ``idle`` (set once those are kept), ``secret`` (a
  check value of the cluster secret: an instance with another secret is refused while
  one with this one is live), ``generation`` (a random id set by the first registration
  in an empty Redis: a new one means Redis lost its data);
* ``nonces`` (sorted set): nonces of forwarded websockets seen, scored by when they
  may be forgotten (a forward is refused after FORWARD_MAX_AGE, so that is how long);
* channel ``stop:<node>``: tokens another instance moved to stopping on that node.

Each node entry carries ``sig``, an HMAC of its name and address under the cluster
secret: an instance forwards a websocket only to an address so signed, so write access
to Redis alone cannot point forwarding at another host.

No periodic task reads every reservation: reserving reads ``used``, reclaiming the
expired part of ``idle``, the stop scan this node's ``stops``, a service's status that
service's slots in ``used``; only an instance's eviction and the full listing (metrics,
the dashboard) read them all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from ..core import lifecycle
from ..core.lifecycle import ENDED_KEPT, State
from ..sessions.reservations import CLAIMS as MOVED_BY_CLAIM
from ..sessions.reservations import ClaimOutcome

CLAIMS: dict[State, tuple[State, ClaimOutcome, bool]] = {
    State.RESERVED: (MOVED_BY_CLAIM[State.RESERVED], ClaimOutcome.CLAIMED, True),
    State.DETACHED: (MOVED_BY_CLAIM[State.DETACHED], ClaimOutcome.REATTACHED, False),
}
"""What :meth:`~.redis_store.RedisStore.claim` does per state: new state (as for every store),
outcome, and whether another instance may take it over (move it to itself); a state
not listed is in use."""
UNSTARTED = State.RESERVED
"""The state whose reservations outlive their instance (nothing runs for them yet)."""
RUNNING = (State.QUEUED, State.STARTING, State.ACTIVE, State.DETACHED)
"""The states of a session that runs on its instance (registered again after Redis lost
its data)."""


@dataclass(frozen=True)
class _Scripts:
    """The Lua source of each script: ``lua/head.lua`` (filled in) and ``lua/NAME.lua``."""

    register: str
    heartbeat: str
    deregister: str
    reserve: str
    claim: str
    transition: str
    remove: str
    nonce: str
    reclaim: str
    read: str
    nodes: str
    stops: str
    job: str
    adopted: str
    share: str
    figures: str


def node_signature(secret: bytes, name: str, address: str) -> str:
    """What an instance's entry in Redis is signed with: only an instance knowing the
    cluster secret can name an address that others forward websockets to."""
    message = f"node\n{name}\n{address}".encode("utf-8", "surrogateescape")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def load_scripts() -> _Scripts:
    """The scripts, each its file after the shared head with this module's constants."""
    folder = resources.files(__package__) / "lua"
    head = (folder / "head.lua").read_text() % {
        "claims": _lua_string(json.dumps({str(state): [str(new), str(outcome), movable]
                                          for state, (new, outcome, movable)
                                          in CLAIMS.items()})),
        "moves": _lua_string(lifecycle.table_json()),
        "unstarted": _lua_string(UNSTARTED), "stopping": _lua_string(State.STOPPING),
        "active": _lua_string(State.ACTIVE), "detached": _lua_string(State.DETACHED),
        "ended": _lua_string(State.ENDED), "ended_kept": round(ENDED_KEPT * 1000)}
    return _Scripts(**{field.name: head + (folder / f"{field.name}.lua").read_text()
                       for field in fields(_Scripts)})


def array(value: Any) -> list[Any]:
    """A JSON array from Lua's cjson, which encodes an empty one as ``{}``."""
    return list(value) if value else []


def _lua_string(text: str) -> str:
    """``text`` as a Lua string literal (long brackets: no escapes to get wrong)."""
    assert "]==]" not in text
    return f"[==[{text}]==]"
