"""The tamper-evident audit log: AuditEvents in a hash chain, written by group commit.

Callers hand :meth:`AuditLog.append` their AuditEvents and the data writes of their
request; one writer task takes everything pending (up to :data:`GROUP_EVENTS` events),
chains the events (see :mod:`hie.audit.chain`) and commits them, every caller's data
writes and the updated chain head in ONE store commit. So a change and its record are
stored together or not at all, and a commit's fsync is shared by all callers in it.

The head (``HieAuditHead/head``: last sequence, last hash, last seal) is updated with
compare-and-set by every commit, so processes sharing one store cannot fork the chain:
a process whose head is stale gets a conflict, reloads the head and chains its group
anew. Seals (``HieAuditSeal/<record id>``) sign the hash at a sequence with the server
key; they are written with a group every ``seal_records`` records, by a timer every
``seal_seconds`` when records were added, and on :meth:`AuditLog.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hie import jsonio
from hie.access.keys import KeyRing
from hie.audit.chain import (
    HEAD_ID,
    HEAD_TYPE,
    SEAL_TYPE,
    Head,
    chained,
    record_hash,
    record_id,
    seal_payload,
)
from hie.fhir.search.dates import now
from hie.store import ConditionConflict, Store, VersionConflict, Write

log = logging.getLogger("hie.audit")

#: Events per group commit (a single larger call still goes in one commit).
GROUP_EVENTS = 2000
#: Conflicts on the chain (another process moved the head) tolerated per group.
_ATTEMPTS = 100
#: Events chained between two turns of the event loop while a group is built.
_YIELD_EVERY = 100
_CHAIN_TYPES = frozenset({"AuditEvent", HEAD_TYPE, SEAL_TYPE})

MakeWrite = Callable[[str, str, dict, str], Write]


class AuditUnavailable(Exception):
    """The audit record could not be written; nothing of the call was stored."""


@dataclass(slots=True)
class _Call:
    """One caller waiting for its events (and data writes) to be committed; a seal
    request has neither."""

    events: Sequence[dict]
    writes: Sequence[Write]
    future: asyncio.Future
    seal: bool = False

    def settle(self, result: list[str] | None = None, error: BaseException | None = None) -> None:
        """Resolve the caller's future unless the caller gave up waiting."""
        if self.future.done():
            return
        if error is None:
            self.future.set_result(result)
        else:
            self.future.set_exception(error)


@dataclass(slots=True)
class _Group:
    """What one commit writes: records, data writes, maybe a seal, and the new head."""

    writes: list[Write]
    ids: list[tuple[_Call, list[str]]]
    head: Head


def _unavailable(cause: BaseException) -> AuditUnavailable:
    error = AuditUnavailable(f"the audit log cannot be written: {cause}")
    error.__cause__ = cause
    return error


def _owner(conflict: VersionConflict | ConditionConflict, calls: Sequence[_Call]) -> _Call | None:
    """The caller whose data write the conflict is about, if any."""
    key = (conflict.type, conflict.id)
    return next((c for c in calls if any((w.type, w.id) == key for w in c.writes)), None)


class AuditLog:
    """The audit log on ``store``, seals signed with ``keys``; ``make_write`` builds a
    new AuditEvent's :class:`Write` (meta and search index set) from its type, id, body
    and instant."""

    def __init__(
        self,
        store: Store,
        keys: KeyRing,
        make_write: MakeWrite,
        *,
        seal_records: int = 1000,
        seal_seconds: float = 10.0,
    ):
        self._store = store
        self._keys = keys
        self._make_write = make_write
        self._seal_records = seal_records
        self._seal_seconds = seal_seconds
        self._head: Head | None = None  # None: reload before the next commit
        self._stale: Head | None = None  # the head a chain conflict was met on
        self._pending: deque[_Call] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task | None = None
        self._timer: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the chain head and start the writer and the seal timer (after the
        store is open)."""
        self._head = Head.of(await self._store.read(HEAD_TYPE, HEAD_ID))
        self._closing = False
        self._writer = asyncio.create_task(self._run(), name="audit-writer")
        self._timer = asyncio.create_task(self._tick(), name="audit-seal-timer")

    async def stop(self) -> None:
        """Commit everything pending, seal the tail and stop the tasks."""
        if self._writer is None:
            return
        self._timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._timer
        self._closing = True
        self._wakeup.set()
        await self._writer
        self._writer = self._timer = None
        call = _Call((), (), asyncio.get_running_loop().create_future(), seal=True)
        await self._process([call])
        if call.future.exception() is not None:
            log.error("audit log not sealed on stop: %s", call.future.exception())

    async def append(self, events: Sequence[dict], writes: Sequence[Write] = ()) -> list[str]:
        """Commit ``events`` (AuditEvents without id) chained, atomically with the data
        ``writes``; returns the events' ids once durable.

        Raises the :class:`VersionConflict`/:class:`ConditionConflict` of one of
        ``writes``, or :class:`AuditUnavailable`; either way nothing was stored."""
        if not events:
            raise ValueError("append needs at least one AuditEvent")
        return await self._submit(list(events), tuple(writes))

    async def seal(self) -> None:
        """Seal the chain now if records were added since the last seal."""
        await self._submit((), (), seal=True)

    async def _submit(
        self, events: Sequence[dict], writes: Sequence[Write], *, seal: bool = False
    ) -> list[str]:
        if self._writer is None or self._closing:
            raise AuditUnavailable("the audit log is not running")
        call = _Call(events, writes, asyncio.get_running_loop().create_future(), seal)
        self._pending.append(call)
        self._wakeup.set()
        return await call.future

    # ---------------------------------------------------------------- writer
    async def _run(self) -> None:
        while calls := await self._next_group():
            await self._process(calls)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._seal_seconds)
            try:
                await self.seal()
            except AuditUnavailable as exc:
                log.error("audit log not sealed: %s", exc)

    async def _next_group(self) -> list[_Call]:
        """The calls of the next commit, in arrival order; empty once stopping with
        nothing pending. A call waits for a later commit when it writes a resource an
        earlier pending call also writes (a commit writes each resource once), or when
        either has a conditional write (a ``guard``) on a type the other writes: a
        store checks a guard against resources *outside* the commit, so two
        conditional creates in one commit would not see each other."""
        while not self._pending and not self._closing:
            self._wakeup.clear()
            await self._wakeup.wait()
        group, later, events = [], [], 0
        touched: set[tuple[str, str]] = set()
        written: set[str] = set()
        guarded: set[str] = set()
        while self._pending and events < GROUP_EVENTS:
            call = self._pending.popleft()
            if call.future.done():  # the caller was cancelled before its commit
                continue
            keys = {(w.type, w.id) for w in call.writes}
            types = {w.type for w in call.writes}
            guards = {w.type for w in call.writes if w.guard}
            if keys & touched or guards & written or types & guarded:
                later.append(call)
            else:
                group.append(call)
                events += len(call.events)
            touched |= keys
            written |= types
            guarded |= guards
        self._pending.extendleft(reversed(later))
        return group

    async def _process(self, calls: list[_Call]) -> None:
        """Commit ``calls`` as one group and settle their futures; a caller whose data
        write conflicts gets the conflict and the group is retried without it."""
        seal = any(c.seal for c in calls)
        for _ in range(_ATTEMPTS):
            try:
                group = await self._commit(calls, seal)
            except (VersionConflict, ConditionConflict) as exc:
                owner = _owner(exc, calls)
                if owner is not None:
                    owner.settle(error=exc)
                    calls.remove(owner)
                    continue
                if exc.type in _CHAIN_TYPES:  # another process extended the chain
                    self._stale, self._head = self._head, None
                    continue
                self._fail(calls, exc)
                return
            except Exception as exc:
                self._fail(calls, exc)
                return
            self._head = group.head
            for call, ids in group.ids:
                call.settle(ids)
            return
        self._fail(calls, RuntimeError("the chain head kept moving under other writers"))

    def _fail(self, calls: Sequence[_Call], cause: BaseException) -> None:
        self._head = None  # the commit's outcome may be unknown: reload before the next
        for call in calls:
            call.settle(error=_unavailable(cause))

    async def _commit(self, calls: list[_Call], seal: bool) -> _Group:
        """Build the group on the current head and commit it (nothing to commit: the
        head is returned unchanged). A chain conflict that reloading the head does not
        explain (the head is as before) means the stored chain is broken."""
        if self._head is None:
            self._head = Head.of(await self._store.read(HEAD_TYPE, HEAD_ID))
            if self._head == self._stale:
                raise RuntimeError("the stored chain does not continue from its head")
        self._stale = None
        group = await self._build(calls, self._head, seal)
        if group.head != self._head:
            await self._store.commit(group.writes)
        return group

    async def _build(self, calls: list[_Call], head: Head, seal: bool) -> _Group:
        """Chain the calls' events after ``head``. A call whose records cannot be built
        fails alone and leaves ``calls``. Building takes CPU (``make_write`` indexes each
        record), so the event loop gets a turn every :data:`_YIELD_EVERY` events."""
        seq, last, writes, ids = head.sequence, head.hash, [], []
        for call in list(calls):
            try:
                records, last_of_call = self._records(call.events, seq, last)
            except Exception as exc:
                call.settle(error=_unavailable(exc))
                calls.remove(call)
                continue
            if seq // _YIELD_EVERY != (seq + len(records)) // _YIELD_EVERY:
                await asyncio.sleep(0)
            seq, last = seq + len(records), last_of_call
            writes += records
            writes += call.writes
            ids.append((call, [w.id for w in records]))
        sealed = head.sealed
        if seq > sealed and (seal or seq - sealed >= self._seal_records):
            writes.append(self._seal_write(seq, last, sealed))
            sealed = seq
        new = Head(head.version + 1, seq, last, sealed)
        if (new.sequence, new.sealed) == (head.sequence, head.sealed):
            return _Group([], ids, head)
        method = "PUT" if head.version else "POST"
        writes.append(
            Write(HEAD_TYPE, HEAD_ID, head.version, new.version, now(), method, new.body())
        )
        return _Group(writes, ids, new)

    def _records(self, events: Sequence[dict], seq: int, last: str) -> tuple[list[Write], str]:
        """The chained record writes of ``events`` numbered after ``seq``, and the
        hash of the last one. Each is ``recorded`` at the instant it is stored at (its
        ``last_updated``, which the store answers date searches from: see
        :data:`~hie.store.port.JOURNAL_TYPES`)."""
        writes = []
        for event in events:
            seq += 1
            instant = now()
            record = chained({**event, "recorded": instant}, last)
            write = self._make_write("AuditEvent", record_id(seq), record, instant)
            last = record_hash(jsonio.loads(write.body, trusted=True))
            writes.append(write)
        return writes, last

    def _seal_write(self, seq: int, last: str, previous: int) -> Write:
        instant = now()
        seal = {"sequence": seq, "hash": last, "sealed": instant, "previousSeal": previous}
        seal["kid"], seal["signature"] = self._keys.sign(seal_payload(seal))
        return Write(SEAL_TYPE, record_id(seq), 0, 1, instant, "POST", jsonio.dumps(seal))
