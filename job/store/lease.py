"""One writer per run: `{RUN_ID}/lease.json` names the process that may change the run now.

The lease names its holder (host or pod name, pid, a random id), carries a generation number that grows with
every takeover, and an expiry. It is created with a conditional write that fails if it exists (S3's
If-None-Match: *) and renewed or taken over with one that fails if it changed since it was read (If-Match: its
ETag); a local store does the same under an flock. So of two processes racing for it, exactly one wins.

Ownership is the pair (holder id, generation), not the ETag: the uploader's child process renews the same lease
as its parent. Every commit, delete and publish first renews it (`Lease.renew`), which fails with LeaseLost once
another process has taken the run over: a stale writer (a pod that was frozen, or cut off, for longer than the
TTL) then stops without committing anything. The check and the write that follows it are two requests: a writer
frozen for a TTL exactly between them could still land that one write, which no S3 API can rule out.

A newcomer waits up to LEASE_TTL_SECONDS for a live lease: it takes it over once it is released, expired by its own
clock, or unchanged (not renewed) for a whole TTL of the holder's (from lease.json, since settings may differ) by
the newcomer's clock, which is immune to skewed clocks. A
holder that renews meanwhile is alive: the newcomer gives up with LeaseHeld (exit 73). A newcomer whose clock runs
ahead of the holder's by more than two thirds of the TTL could take a live lease too early; the holder then finds
it lost at its next renewal and stops, so the run stays with one writer.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .blob import CheckpointStore, StoreError

LEASE = "lease.json"


class LeaseHeld(Exception):
    """Another live process holds this run's lease (exit 73). str(e) is one line naming it."""


class LeaseLost(StoreError):
    """This process no longer holds the lease: another one took the run over. Nothing more may be committed."""


@dataclass(frozen=True)
class Ticket:
    """What identifies one holding of the lease; the uploader's child process gets a copy."""
    run_id: str
    holder_id: str
    generation: int
    ttl: float
    pid: int    # the job's process, which the uploader's child names too


def _holder(lease: dict) -> dict:
    return lease.get("holder") if isinstance(lease.get("holder"), dict) else {}


def _describe(lease: dict) -> str:
    holder = _holder(lease)
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} (generation {lease.get('generation', '?')})"


def _parse(data: bytes) -> dict:
    """A lease that is not one (garbage, a wrong shape) counts as expired: whoever wrote it holds nothing."""
    try:
        lease = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return lease if isinstance(lease, dict) else {}


class Lease:
    """This process's hold on one run. `acquire` takes it (waiting for a live holder up to the TTL), `renew` is the
    check before every change, `keep_renewed` renews it in the background, `release` gives it up."""

    def __init__(self, store: CheckpointStore, run_id: str, ttl: float, ticket: Ticket | None = None):
        self.store, self.run_id, self.ttl = store, run_id, ttl
        self.key = f"{run_id}/{LEASE}"
        self.ticket = ticket   # set once held
        self.on_lost: Callable[[LeaseLost], None] | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @classmethod
    def join(cls, store: CheckpointStore, ticket: Ticket) -> Lease:
        """The holder's lease, in another process of the holder (the uploader's child)."""
        return cls(store, ticket.run_id, ticket.ttl, ticket)

    def _body(self, generation: int, holder_id: str, released: bool = False) -> bytes:
        now = time.time()
        pid = self.ticket.pid if self.ticket else os.getpid()
        return json.dumps({
            "holder": {"host": socket.gethostname(), "pid": pid, "id": holder_id},
            "generation": generation, "ttl_seconds": self.ttl, "renewed_at": now,
            "expires_at": now if released else now + self.ttl, "released": released,
        }, indent=2, sort_keys=True).encode()

    # ---------------------------------------------------------------- taking it

    def acquire(self, wait: float | None = None, say: Callable[[str], None] = print,
                poll: float | None = None) -> Ticket:
        """Take the lease, waiting up to `wait` (default: the TTL) for a live holder to release it or let it lapse.
        Raises LeaseHeld if the holder kept renewing it all along."""
        wait = self.ttl if wait is None else wait
        poll = poll if poll is not None else min(1.0, self.ttl / 5)
        holder_id = uuid.uuid4().hex
        started = time.monotonic()
        seen_tag, seen_since, said = None, started, False
        while True:
            found = self.store.get_tagged(self.key)
            if found is None:
                if self.store.put_if(self.key, self._body(1, holder_id), None):
                    return self._taken(holder_id, 1)
                continue
            data, tag = found
            lease = _parse(data)
            holder = _holder(lease)
            if holder.get("id") == holder_id:   # our own write, whose answer was lost and retried
                return self._taken(holder_id, lease["generation"])
            if tag != seen_tag:
                seen_tag, seen_since = tag, time.monotonic()
            expires, held_ttl = lease.get("expires_at"), lease.get("ttl_seconds")
            held_ttl = held_ttl if isinstance(held_ttl, (int, float)) and held_ttl > 0 else self.ttl
            # Unchanged for the holder's own TTL (not ours: settings may differ) also counts, whatever the clocks say.
            free = (lease.get("released") is True or not isinstance(expires, (int, float))
                    or expires <= time.time() or time.monotonic() - seen_since >= held_ttl)
            if free:
                generation = lease.get("generation")
                generation = generation + 1 if isinstance(generation, int) and generation > 0 else 1
                if self.store.put_if(self.key, self._body(generation, holder_id), tag):
                    if not lease.get("released") and lease:
                        say(f"took over the lease of {_describe(lease)}, which stopped renewing it")
                    return self._taken(holder_id, generation)
                continue
            if time.monotonic() - started >= wait:
                raise LeaseHeld(
                    f"RUN_ID={self.run_id!r} is being written by another live process, {_describe(lease)}, which "
                    f"kept renewing {self.store.uri}/{self.key} for the {wait:g} s waited; one writer per run, so "
                    f"this one stops. Let that one finish (or stop it), or use another RUN_ID")
            if not said:
                say(f"RUN_ID={self.run_id!r} is held by {_describe(lease)}; waiting up to {wait:g} s for it to be "
                    f"released or to expire")
                said = True
            time.sleep(poll)

    def _taken(self, holder_id: str, generation: int) -> Ticket:
        self.ticket = Ticket(self.run_id, holder_id, generation, self.ttl, os.getpid())
        return self.ticket

    # ---------------------------------------------------------------- holding it

    def renew(self) -> None:
        """The check before every commit, delete and publish: still ours at our generation, and good for another
        TTL from now. Raises LeaseLost if another process took the run over."""
        ticket = self.ticket
        if ticket is None:
            raise LeaseLost(f"RUN_ID={self.run_id!r}: this process never held the lease; nothing is committed")
        body = self._body(ticket.generation, ticket.holder_id)
        for _ in range(10):
            found = self.store.get_tagged(self.key)
            lease = _parse(found[0]) if found else {}
            holder = _holder(lease)
            if (holder.get("id"), lease.get("generation"), lease.get("released")) != \
                    (ticket.holder_id, ticket.generation, False):
                now = f"now held by {_describe(lease)}" if found and not lease.get("released") else \
                    "released" if found else "deleted"
                raise LeaseLost(f"RUN_ID={self.run_id!r}: this process lost the run's lease (generation "
                                f"{ticket.generation}; {now}); stopping without committing anything more")
            if self.store.put_if(self.key, body, found[1]):
                return
            # Changed since read: our own other process renewed it, or a takeover; read again.
        raise StoreError(f"RUN_ID={self.run_id!r}: could not renew {self.key} after 10 conflicting writes")

    def keep_renewed(self, said: Callable[[str], None]) -> None:
        """Renew every third of the TTL from a daemon thread. A lost lease goes to on_lost; a failed renewal
        (store unreachable) is said and tried again."""
        def renew_forever():
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.renew()
                except LeaseLost as lost:
                    if self.on_lost:
                        self.on_lost(lost)
                    return
                except Exception as exc:   # noqa: BLE001 - the next tick tries again; a takeover shows there
                    said(f"could not renew the run's lease ({type(exc).__name__}); trying again")
        self._renewer = threading.Thread(target=renew_forever, name="lease-renewer", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Give the lease up (marked released, so a newcomer takes it at once). Best effort: if this fails, the
        lease simply expires after the TTL."""
        self._stop.set()
        self.on_lost = None   # what is still uploading now finds the lease released and commits nothing
        if self._renewer is not None and self._renewer is not threading.current_thread():
            # A renewal in flight would overwrite the release (or make its conditional write fail): let it land.
            self._renewer.join(timeout=self.ttl)
        ticket, self.ticket = self.ticket, None
        if ticket is None:
            return
        try:
            for _ in range(3):   # a conflict: the uploader's child renewed it in between; read again
                found = self.store.get_tagged(self.key)
                if found is None:
                    return
                lease = _parse(found[0])
                holder = _holder(lease)
                if (holder.get("id"), lease.get("generation")) != (ticket.holder_id, ticket.generation):
                    return
                if self.store.put_if(self.key, self._body(ticket.generation, ticket.holder_id, released=True),
                                     found[1]):
                    return
        except Exception:   # noqa: BLE001 - see the docstring
            pass
