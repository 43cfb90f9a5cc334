"""Durability of the embedded store under a real ``hie serve`` process: data survives a
graceful restart, and a transaction interrupted by ``kill -9`` is either entirely
present or entirely absent after the restart (golden records of the master patient
index, written in the same commits, included)."""

from __future__ import annotations

import json
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from hie.mpi.records import GOLDEN_TAG
from tests.server import HieServer, mint_token

pytestmark = pytest.mark.slow

#: Entries of the transaction that is killed: enough for its processing to take a
#: while (a second or two), so that kills land before, during and after the commit.
ENTRIES = 4000
#: Kill points, as fractions of the measured processing time of such a transaction
#: (which varies from run to run, hence the spread), and ``"commit"``: as soon as the
#: SQLite write-ahead log is written to, that is while the store commit is running.
KILL_AT = (0.1, "commit", 0.7, "commit", 1.3)
#: Search parameter leaving golden records (which carry their members' identifiers) out.
MEMBERS = {"_tag:not": f"{GOLDEN_TAG['system']}|{GOLDEN_TAG['code']}"}


def patient(system: str, value: str, **extra) -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": value}],
        "name": [{"family": f"Family-{value}", "given": ["Given"]}],
        "birthDate": "1970-01-01",
        **extra,
    }


def transaction(system: str, n: int) -> bytes:
    """A transaction of ``n`` Patients sharing the identifier ``system``, each one
    referring to the previous one (so urn:uuid resolution has work to do)."""
    urns = [f"urn:uuid:{uuid.uuid4()}" for _ in range(n)]
    entries = []
    for i, full_url in enumerate(urns):
        resource = patient(system, str(i))
        if i:
            resource["link"] = [{"other": {"reference": urns[i - 1]}, "type": "seealso"}]
        entries.append(
            {
                "fullUrl": full_url,
                "resource": resource,
                "request": {"method": "POST", "url": "Patient"},
            }
        )
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}).encode()


def send(server: HieServer, body: bytes) -> socket.socket:
    """Send ``POST /fhir`` completely and return the socket, the response unread."""
    head = (
        f"POST /fhir HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {server.token}\r\nContent-Type: application/fhir+json\r\n"
        f"Accept: application/fhir+json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    sock.sendall(head + body)
    return sock


def receive(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed the connection (or died)."""
    chunks = []
    try:
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    return b"".join(chunks)


def status_of(raw: bytes) -> int | None:
    """The status code of a raw HTTP response, None if not even the status line came."""
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw.split(b" ", 2)[1])


def count(client, system: str | None = None) -> int:
    """Current Patients (members' records with an identifier of ``system`` when given,
    else all, golden records included)."""
    params = {"_count": "0"}
    if system is not None:
        params.update(identifier=f"{system}|", **MEMBERS)
    r = client.get("Patient", params=params)
    assert r.status_code == 200, r.text
    return r.json()["total"]


def history_count(client) -> int:
    r = client.get("_history", params={"_count": "0"})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def wal_state(data_dir: Path) -> tuple[int, int]:
    """Size and modification time of the SQLite write-ahead log (it may be rewritten
    from its start after a checkpoint, so the size alone need not change)."""
    wal = data_dir / "hie.sqlite3-wal"
    if not wal.exists():
        return (0, 0)
    st = wal.stat()
    return (st.st_size, st.st_mtime_ns)


def wait_for_wal_write(data_dir: Path, before: tuple[int, int], deadline: float) -> str:
    """Poll until the write-ahead log changes: the commit has begun writing pages."""
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if wal_state(data_dir) != before:
            return f"WAL written after {time.monotonic() - started:.2f}s"
        time.sleep(0.0005)
    return "WAL never written"


def warm_up(server: HieServer) -> None:
    """One small committed transaction: proves the store takes writes and loads what
    the first request loads, so that timings are those of a warm server."""
    system = f"urn:warm-up:{uuid.uuid4()}"
    with server.client() as c:
        r = c.post("", content=transaction(system, 1))
        assert r.status_code == 200, r.text
        location = r.json()["entry"][0]["response"]["location"]
        assert c.get(location).json()["identifier"][0]["system"] == system


# ---------------------------------------------------------------- graceful restart
def test_data_survives_a_restart(tmp_path: Path):
    token = mint_token(tmp_path)
    server = HieServer(tmp_path, token)
    server.start()
    try:
        with server.client() as c:
            r = c.post("Patient", json=patient("urn:restart", "a"))
            assert r.status_code == 201, r.text
            pid = r.json()["id"]
            v1 = r.json()
            r = c.put(f"Patient/{pid}", json={**v1, "active": True})
            assert r.status_code == 200, r.text
            v2 = r.json()
            r = c.put("Patient/gone", json={"resourceType": "Patient", "id": "gone"})
            assert r.status_code == 201
            assert c.delete("Patient/gone").status_code == 204
            r = c.post(
                "",
                content=json.dumps(
                    {
                        "resourceType": "Bundle",
                        "type": "transaction",
                        "entry": [
                            {
                                "fullUrl": "urn:uuid:5b1f3a52-9a51-4b9b-9c1c-3f7e0c0b7c11",
                                "resource": patient("urn:restart", "b"),
                                "request": {"method": "POST", "url": "Patient"},
                            },
                            {
                                "resource": {
                                    "resourceType": "Observation",
                                    "status": "final",
                                    "code": {"text": "weight"},
                                    "subject": {
                                        "reference": "urn:uuid:5b1f3a52-9a51-4b9b-9c1c-3f7e0c0b7c11"
                                    },
                                    "valueQuantity": {"value": 72.5, "unit": "kg"},
                                },
                                "request": {"method": "POST", "url": "Observation"},
                            },
                        ],
                    }
                ),
            )
            assert r.status_code == 200, r.text
            tx_resources = [e["resource"] for e in r.json()["entry"]]
            search_before = c.get(
                "Patient", params={"identifier": "urn:restart|", **MEMBERS}
            ).json()
            history_before = c.get(f"Patient/{pid}/_history").json()
            system_history = history_count(c)

        code = server.stop()
        assert code in (0, -signal.SIGTERM), f"unclean exit {code}"
        server.start()  # same data directory, a new port, the same signing key

        with server.client() as c:
            assert c.get(f"Patient/{pid}").json() == v2
            assert c.get(f"Patient/{pid}/_history/1").json() == v1
            assert c.get(f"Patient/{pid}/_history/2").json() == v2
            assert c.get("Patient/gone").status_code == 410
            for resource in tx_resources:
                assert c.get(f"{resource['resourceType']}/{resource['id']}").json() == resource
            search_after = c.get("Patient", params={"identifier": "urn:restart|", **MEMBERS}).json()
            assert [e["resource"] for e in search_after["entry"]] == [
                e["resource"] for e in search_before["entry"]
            ]
            assert search_after["total"] == 2
            history_after = c.get(f"Patient/{pid}/_history").json()
            assert [e["resource"] for e in history_after["entry"]] == [
                e["resource"] for e in history_before["entry"]
            ]
            assert history_count(c) == system_history
            # Versioning continues where it stopped.
            r = c.put(f"Patient/{pid}", json={**v2, "active": False}, headers={"If-Match": 'W/"2"'})
            assert r.status_code == 200, r.text
            assert r.json()["meta"]["versionId"] == "3"
    finally:
        server.close()


# ---------------------------------------------------------------- kill -9
def test_transaction_killed_mid_flight_leaves_no_partial_trace(tmp_path: Path):
    token = mint_token(tmp_path)
    server = HieServer(tmp_path, token)
    outcomes: list[tuple[str, int | None, int]] = []  # (kill point, status, count)
    found_after: dict[str, int] = {}  # identifier system of an attempt -> Patients found
    try:
        # Measure how long a warm server takes for the whole transaction.
        server.start()
        warm_up(server)
        calibration = f"urn:calibration:{uuid.uuid4()}"
        body = transaction(calibration, ENTRIES)
        started = time.monotonic()
        raw = receive(send(server, body))
        took = time.monotonic() - started
        assert status_of(raw) == 200, raw[:2000]
        with server.client() as c:
            assert count(c, calibration) == ENTRIES
            last = c.get(
                "Patient", params={"identifier": f"{calibration}|{ENTRIES - 1}", **MEMBERS}
            )
            link, *_ = [
                link
                for link in last.json()["entry"][0]["resource"]["link"]
                if "extension" not in link  # its own link, not the MPI's
            ]
            assert c.get(link["other"]["reference"]).json()["identifier"][0]["value"] == str(
                ENTRIES - 2
            )

        for fraction in KILL_AT:
            system = f"urn:attempt:{uuid.uuid4()}"
            body = transaction(system, ENTRIES)
            wal = wal_state(tmp_path)
            sock = send(server, body)  # the whole request is on its way
            if fraction == "commit":
                when = wait_for_wal_write(tmp_path, wal, deadline=3 * took)
            else:
                time.sleep(took * fraction)
                when = f"{took * fraction:.2f}s"
            server.kill()
            status = status_of(receive(sock))

            server.start()
            warm_up(server)  # the store takes writes after the crash
            with server.client() as c:
                found = count(c, system)
            outcomes.append((when, status, found))
            found_after[system] = found
            assert found in (0, ENTRIES), f"partial transaction after kill -9: {outcomes}"
            if status == 200:
                assert found == ENTRIES, outcomes

        with server.client() as c:
            for system, found in found_after.items():  # nothing appeared or vanished later
                assert count(c, system) == found
            # Every version in history belongs to a current resource: a partial commit
            # would leave history rows (or index rows) without their resource.
            assert history_count(c) == count(c)
            r = c.put(
                "Patient/after-the-crashes",
                json={"resourceType": "Patient", "id": "after-the-crashes"},
            )
            assert r.status_code == 201, r.text
        assert any(status is None and found == 0 for _, status, found in outcomes), (
            f"no kill landed while the transaction was in flight (took {took:.2f}s): {outcomes}"
        )
    finally:
        server.close()
