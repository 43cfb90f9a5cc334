"""Batch and transaction Bundles posted to the FHIR base URL, on both stores.

Everything goes through the HTTP API as a client would; "nothing written" is checked
by searching and by the system history, never by looking into the store. Every Patient
written also gets a golden record from the master patient index: searches that count
what the bundles wrote leave golden records out (``MEMBERS``).
"""

from __future__ import annotations

import uuid

import pytest

from hie.mpi.records import GOLDEN_TAG

FHIR = "application/fhir+json"
SYS = "urn:hie-test:bundles"
#: Search parameters leaving golden records out.
MEMBERS = {"_tag:not": f"{GOLDEN_TAG['system']}|{GOLDEN_TAG['code']}"}
EXT = "http://example.org/fhir/StructureDefinition/test-reference"


# ---------------------------------------------------------------- helpers
def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def patient(value: str | None = None, system: str = SYS, **extra) -> dict:
    body: dict = {"resourceType": "Patient", **extra}
    if value is not None:
        body["identifier"] = [{"system": system, "value": value}]
    return body


def observation(value: str | None = None, **extra) -> dict:
    body: dict = {"resourceType": "Observation", "status": "final", "code": {"text": "test"}}
    if value is not None:
        body["identifier"] = [{"system": SYS, "value": value}]
    body.update(extra)
    return body


def entry(method: str, url: str, resource=None, full_url: str | None = None, **request) -> dict:
    out: dict = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        out["resource"] = resource
    if full_url is not None:
        out["fullUrl"] = full_url
    return out


def bundle(entries: list[dict], kind: str = "transaction") -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def post(client, entries: list[dict], kind: str = "transaction", **kwargs):
    return client.post("/fhir", json=bundle(entries, kind), **kwargs)


def total(client, type_: str, system: str = SYS, value: str = "") -> int:
    """How many current ``type_`` resources carry an identifier of ``system`` (golden
    records, which carry their member records' identifiers, left out)."""
    params = {"identifier": f"{system}|{value}", "_count": "0", **MEMBERS}
    r = client.get(f"/fhir/{type_}", params=params)
    assert r.status_code == 200, r.text
    return r.json()["total"]


def history_total(client) -> int:
    """The number of versions on the whole server."""
    r = client.get("/fhir/_history", params={"_count": "0"})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def create(client, resource: dict) -> dict:
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return r.json()


def put(client, resource: dict) -> dict:
    r = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
    assert r.status_code in (200, 201), r.text
    return r.json()


def read(client, ref: str) -> dict:
    r = client.get(f"/fhir/{ref}")
    assert r.status_code == 200, r.text
    return r.json()


def names_entry(body: dict, index: int) -> bool:
    """True when an issue of the OperationOutcome points at ``Bundle.entry[index]``
    (``Bundle.entry[1]`` is no prefix of ``Bundle.entry[10]``: the bracket closes)."""
    tag = f"Bundle.entry[{index}]"
    assert body["resourceType"] == "OperationOutcome", body
    return any(
        tag in issue.get("diagnostics", "")
        or any(e.startswith(tag) for e in issue.get("expression", []))
        for issue in body["issue"]
    )


def id_of(response_entry: dict) -> str:
    """The logical id from an entry's ``response.location`` (``Type/id/_history/n``)."""
    return response_entry["response"]["location"].split("/")[1]


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- all or nothing
INVALID_ENTRIES = {
    "invalid element value (422)": (patient("bad", birthDate="not-a-date"), {422}),
    "unknown element (422)": (patient("bad", favouriteColour="blue"), {422}),
    "type differs from URL (400)": (observation("bad"), {400}),
    "no resourceType (400)": ({"identifier": [{"system": SYS, "value": "bad"}]}, {400}),
}


@pytest.mark.parametrize("name", list(INVALID_ENTRIES))
def test_transaction_with_an_invalid_entry_writes_nothing(client, name):
    invalid, statuses = INVALID_ENTRIES[name]
    existing = put(client, patient("kept", id="kept", active=True))
    other = put(client, patient("other", id="other"))
    before = history_total(client)
    pat = urn()
    entries = [
        entry("POST", "Patient", patient("p0"), pat),
        entry("POST", "Patient", patient("p1")),
        entry("POST", "Patient", invalid),  # index 2: fails
        entry("POST", "Observation", observation("o3", subject={"reference": pat})),
        entry("PUT", "Patient/kept", patient("kept", id="kept", active=False)),
        entry("PUT", "Patient/new-one", patient("p5", id="new-one")),
        entry("DELETE", "Patient/other"),
    ]

    r = post(client, entries)

    assert r.status_code in statuses, r.text
    assert names_entry(r.json(), 2), r.json()
    assert total(client, "Patient") == 2  # "kept" and "other", from before
    assert total(client, "Observation") == 0
    assert client.get("/fhir/Patient/new-one").status_code == 404
    assert read(client, "Patient/kept") == existing
    assert read(client, "Patient/other") == other
    assert history_total(client) == before


def test_transaction_failing_in_its_last_write_undoes_the_earlier_phases(client):
    """DELETE, POST and the first PUT are planned before the PUT that fails: the
    failure must leave no trace of any of them."""
    doomed = put(client, patient("doomed", id="doomed"))
    guarded = put(client, patient("guarded", id="guarded"))
    put(client, patient("guarded", id="guarded", active=True))  # now at version 2
    before = history_total(client)

    r = post(
        client,
        [
            entry("DELETE", "Patient/doomed"),
            entry("POST", "Patient", patient("created")),
            entry("PUT", "Patient/fresh", patient("fresh", id="fresh")),
            entry("PUT", "Patient/guarded", guarded, ifMatch='W/"1"'),  # stale
        ],
    )

    assert r.status_code == 412, r.text
    assert names_entry(r.json(), 3)
    assert read(client, "Patient/doomed") == doomed
    assert read(client, "Patient/guarded")["meta"]["versionId"] == "2"
    assert client.get("/fhir/Patient/fresh").status_code == 404
    assert total(client, "Patient", value="created") == 0
    assert history_total(client) == before


def test_transaction_needs_every_permission_it_uses(client, mint):
    token = mint(scope="system/Observation.cruds system/Patient.rs")
    r = post(
        client,
        [
            entry("POST", "Observation", observation("o0")),
            entry("POST", "Patient", patient("p1")),
        ],
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 403, r.text
    assert names_entry(r.json(), 1)
    assert total(client, "Observation") == 0
    assert total(client, "Patient") == 0


def test_transaction_without_a_token_is_refused(anon):
    r = anon.post(
        "/fhir",
        json=bundle([entry("POST", "Patient", patient("x"))]),
        headers={"Content-Type": FHIR},
    )
    assert r.status_code == 401
    assert "WWW-Authenticate" in r.headers


# ---------------------------------------------------------------- processing order
def test_get_entry_placed_first_sees_writes_of_later_entries(client):
    r = post(
        client,
        [
            entry("GET", f"Patient?identifier={SYS}|later&_tag:not={MEMBERS['_tag:not']}"),
            entry("GET", "Patient/client-id"),
            entry("POST", "Patient", patient("later")),
            entry("PUT", "Patient/client-id", patient("put", id="client-id")),
        ],
    )
    body = ok(r)
    search, read_back, created, updated = body["entry"]
    assert search["response"]["status"] == "200 OK"
    assert search["resource"]["type"] == "searchset"
    assert search["resource"]["total"] == 1
    assert search["resource"]["entry"][0]["resource"]["id"] == id_of(created)
    assert read_back["response"]["status"] == "200 OK"
    assert read_back["resource"]["id"] == "client-id"
    assert read_back["resource"] == updated["resource"]


def test_delete_and_post_in_one_transaction(client):
    old = create(client, patient("same"))
    r = post(
        client,
        [
            entry("POST", "Patient", patient("same")),  # listed first, processed second
            entry("GET", f"Patient/{old['id']}"),
            entry("DELETE", f"Patient/{old['id']}"),
        ],
    )
    body = ok(r)
    created, read_back, deleted = body["entry"]
    assert created["response"]["status"] == "201 Created"
    assert id_of(created) != old["id"]
    assert deleted["response"]["status"].startswith("204")
    assert deleted["response"]["etag"] == 'W/"2"'
    # The GET runs last and sees the deletion (answered in its own entry).
    assert read_back["response"]["status"].startswith("410")
    assert client.get(f"/fhir/Patient/{old['id']}").status_code == 410
    found = client.get("/fhir/Patient", params={"identifier": f"{SYS}|same", **MEMBERS}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [id_of(created)]


def test_conditional_create_sees_a_delete_processed_before_it(client):
    old = create(client, patient("recreated"))
    r = post(
        client,
        [
            entry(
                "POST",
                "Patient",
                patient("recreated"),
                ifNoneExist=f"identifier={SYS}|recreated",
            ),
            entry("DELETE", f"Patient/{old['id']}"),
        ],
    )
    body = ok(r)
    # DELETE is processed first, so nothing matches the condition any more: created.
    assert body["entry"][0]["response"]["status"] == "201 Created"
    assert total(client, "Patient", value="recreated") == 1


def test_failing_get_after_committed_writes_answers_in_its_entry(client):
    """Reads run after the commit; a failing read must not turn a transaction that
    was applied into an error response."""
    r = post(
        client,
        [
            entry("POST", "Patient", patient("committed")),
            entry("GET", "Patient/does-not-exist"),
        ],
    )
    body = ok(r)
    assert body["type"] == "transaction-response"
    created, missing = body["entry"]
    assert created["response"]["status"] == "201 Created"
    assert missing["response"]["status"].startswith("404")
    assert missing["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert "resource" not in missing
    assert read(client, f"Patient/{id_of(created)}")["identifier"][0]["value"] == "committed"


# ---------------------------------------------------------------- urn:uuid resolution
def test_urn_uuid_references_are_resolved_wherever_they_occur(client):
    pat, prac, enc, org, obs = urn(), urn(), urn(), urn(), urn()
    entries = [
        # The Observation comes first and refers to resources listed after it.
        entry(
            "POST",
            "Observation",
            observation(
                "obs",
                subject={"reference": pat, "display": "the patient"},
                encounter={"reference": enc},
                performer=[{"reference": prac}, {"reference": org}],
                extension=[{"url": EXT, "valueReference": {"reference": prac}}],
                component=[
                    {
                        "code": {"text": "part"},
                        "extension": [{"url": EXT, "valueReference": {"reference": pat}}],
                        "valueString": "x",
                    }
                ],
            ),
            obs,
        ),
        entry(
            "POST",
            "Encounter",
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "AMB",
                },
                "subject": {"reference": pat},
                "participant": [
                    {"individual": {"reference": prac}},
                    {"individual": {"reference": prac}, "type": [{"text": "second"}]},
                ],
                "serviceProvider": {"reference": org},
            },
            enc,
        ),
        entry("POST", "Practitioner", {"resourceType": "Practitioner"}, prac),
        # A PUT with a client id can be referred to by its urn too.
        entry("PUT", "Organization/org-1", {"resourceType": "Organization", "id": "org-1"}, org),
        entry(
            "POST",
            "Patient",
            patient(
                "pat",
                generalPractitioner=[{"reference": prac}],
                managingOrganization={"reference": org},
            ),
            pat,
        ),
    ]
    body = ok(post(client, entries))
    ids = [
        id_of(e) if "location" in e["response"] else None for e in body["entry"]
    ]  # request order
    obs_id, enc_id, prac_id, org_id, pat_id = ids
    assert org_id == "org-1"
    assert len({obs_id, enc_id, prac_id, pat_id}) == 4

    o = read(client, f"Observation/{obs_id}")
    assert o["subject"] == {"reference": f"Patient/{pat_id}", "display": "the patient"}
    assert o["encounter"] == {"reference": f"Encounter/{enc_id}"}
    assert o["performer"] == [
        {"reference": f"Practitioner/{prac_id}"},
        {"reference": "Organization/org-1"},
    ]
    assert o["extension"][0]["valueReference"] == {"reference": f"Practitioner/{prac_id}"}
    assert o["component"][0]["extension"][0]["valueReference"] == {"reference": f"Patient/{pat_id}"}
    e = read(client, f"Encounter/{enc_id}")
    assert e["subject"] == {"reference": f"Patient/{pat_id}"}
    assert [p["individual"] for p in e["participant"]] == [
        {"reference": f"Practitioner/{prac_id}"}
    ] * 2
    assert e["serviceProvider"] == {"reference": "Organization/org-1"}
    p = read(client, f"Patient/{pat_id}")
    assert p["generalPractitioner"] == [{"reference": f"Practitioner/{prac_id}"}]
    assert p["managingOrganization"] == {"reference": "Organization/org-1"}
    # The response bundle carries the rewritten resources too.
    assert body["entry"][0]["resource"] == o
    for resource in (o, e, p):
        assert "urn:uuid:" not in str(resource)


def test_urn_of_a_conditional_create_that_matches_resolves_to_the_existing_id(client):
    existing = create(client, patient("known"))
    pat = urn()
    r = post(
        client,
        [
            entry(
                "POST",
                "Patient",
                patient("known", active=True),
                pat,
                ifNoneExist=f"identifier={SYS}|known",
            ),
            entry("POST", "Observation", observation("o", subject={"reference": pat})),
        ],
    )
    body = ok(r)
    matched, obs = body["entry"]
    assert matched["response"]["status"] == "200 OK"
    assert matched["resource"]["id"] == existing["id"]
    assert matched["resource"] == existing  # not updated
    assert obs["resource"]["subject"] == {"reference": f"Patient/{existing['id']}"}
    assert total(client, "Patient", value="known") == 1
    stored = read(client, f"Observation/{id_of(obs)}")
    assert stored["subject"] == {"reference": f"Patient/{existing['id']}"}


def test_urn_of_a_conditional_create_without_match_resolves_to_the_new_id(client):
    pat = urn()
    body = ok(
        post(
            client,
            [
                entry("POST", "Observation", observation("o", subject={"reference": pat})),
                entry(
                    "POST",
                    "Patient",
                    patient("unknown"),
                    pat,
                    ifNoneExist=f"identifier={SYS}|unknown",
                ),
            ],
        )
    )
    obs, created = body["entry"]
    assert created["response"]["status"] == "201 Created"
    assert obs["resource"]["subject"] == {"reference": f"Patient/{id_of(created)}"}


# ---------------------------------------------------------------- conditional references
def test_conditional_reference_matching_one_resource_is_resolved(client):
    target = create(client, patient("one"))
    create(client, patient("other"))
    body = ok(
        post(
            client,
            [
                entry(
                    "POST",
                    "Observation",
                    observation(
                        "o",
                        subject={"reference": f"Patient?identifier={SYS}|one"},
                        performer=[{"reference": f"Patient?identifier={SYS}|one"}],
                    ),
                )
            ],
        )
    )
    stored = read(client, f"Observation/{id_of(body['entry'][0])}")
    assert stored["subject"] == {"reference": f"Patient/{target['id']}"}
    assert stored["performer"] == [{"reference": f"Patient/{target['id']}"}]


@pytest.mark.parametrize("matches", [0, 2])
def test_conditional_reference_not_matching_exactly_one_fails_the_transaction(client, matches):
    for _ in range(matches):
        create(client, patient("ambiguous"))
    before = history_total(client)
    r = post(
        client,
        [
            entry("POST", "Patient", patient("side-effect")),
            entry(
                "POST",
                "Observation",
                observation("o", subject={"reference": f"Patient?identifier={SYS}|ambiguous"}),
            ),
        ],
    )
    assert r.status_code == 412, r.text
    assert names_entry(r.json(), 1)
    assert total(client, "Observation") == 0
    assert total(client, "Patient", value="side-effect") == 0
    assert history_total(client) == before


# ---------------------------------------------------------------- conditional update
def test_conditional_update_entries(client):
    existing = create(client, patient("cu-1"))
    ref = urn()
    body = ok(
        post(
            client,
            [
                entry("PUT", f"Patient?identifier={SYS}|cu-1", patient("cu-1", active=True), ref),
                entry("PUT", f"Patient?identifier={SYS}|cu-2", patient("cu-2")),
                entry("POST", "Observation", observation("o", subject={"reference": ref})),
            ],
        )
    )
    updated, created, obs = body["entry"]
    assert updated["response"]["status"] == "200 OK"
    assert updated["response"]["etag"] == 'W/"2"'
    assert updated["resource"]["id"] == existing["id"]
    assert read(client, f"Patient/{existing['id']}")["active"] is True
    assert created["response"]["status"] == "201 Created"
    assert read(client, f"Patient/{id_of(created)}")["identifier"][0]["value"] == "cu-2"
    assert obs["resource"]["subject"] == {"reference": f"Patient/{existing['id']}"}
    assert total(client, "Patient") == 2


def test_conditional_update_matching_several_fails_the_transaction(client):
    create(client, patient("twin"))
    create(client, patient("twin"))
    before = history_total(client)
    r = post(
        client,
        [
            entry("POST", "Patient", patient("side-effect")),
            entry("PUT", f"Patient?identifier={SYS}|twin", patient("twin", active=True)),
        ],
    )
    assert r.status_code == 412, r.text
    assert names_entry(r.json(), 1)
    assert history_total(client) == before
    found = client.get("/fhir/Patient", params={"identifier": f"{SYS}|twin", **MEMBERS}).json()
    assert all("active" not in e["resource"] for e in found["entry"])


# ---------------------------------------------------------------- ifMatch
def test_if_match_in_entries(client):
    put(client, patient("im", id="im"))
    body = ok(
        post(
            client,
            [
                entry("PUT", "Patient/im", patient("im", id="im", active=True), ifMatch='W/"1"'),
                entry("PUT", "Patient/im2", patient("im2", id="im2")),
            ],
        )
    )
    assert body["entry"][0]["response"]["status"] == "200 OK"
    assert body["entry"][0]["response"]["etag"] == 'W/"2"'

    for stale in ('W/"1"', '"1"', 'W/"3"'):
        before = history_total(client)
        r = post(
            client,
            [
                entry("PUT", "Patient/im2", patient("im2", id="im2", active=True)),
                entry("DELETE", "Patient/im", ifMatch=stale),
            ],
        )
        assert r.status_code == 412, (stale, r.text)
        assert names_entry(r.json(), 1)
        assert history_total(client) == before
        assert read(client, "Patient/im")["meta"]["versionId"] == "2"
        assert "active" not in read(client, "Patient/im2")

    r = post(client, [entry("DELETE", "Patient/im", ifMatch='"2"')])
    assert ok(r)["entry"][0]["response"]["status"].startswith("204")
    assert client.get("/fhir/Patient/im").status_code == 410


# ---------------------------------------------------------------- one change per resource
@pytest.mark.parametrize(
    "pair",
    ["put+put", "put+delete", "patch+put", "conditional+put", "create twice"],
)
def test_changing_a_resource_twice_fails_the_transaction(client, pair):
    put(client, patient("twice", id="twice"))
    before = history_total(client)
    again = patient("twice", id="twice", active=True)
    patch = [{"op": "add", "path": "/active", "value": False}]
    entries = {
        "put+put": [entry("PUT", "Patient/twice", again), entry("PUT", "Patient/twice", again)],
        "put+delete": [entry("PUT", "Patient/twice", again), entry("DELETE", "Patient/twice")],
        "patch+put": [entry("PATCH", "Patient/twice", patch), entry("PUT", "Patient/twice", again)],
        "conditional+put": [
            entry("PUT", f"Patient?identifier={SYS}|twice", patient("twice")),
            entry("PUT", "Patient/twice", again),
        ],
        "create twice": [
            entry("PUT", "Patient/fresh", patient("fresh", id="fresh")),
            entry("PUT", "Patient/fresh", patient("fresh", id="fresh", active=True)),
        ],
    }[pair]
    r = post(client, [entry("POST", "Patient", patient("side-effect")), *entries])
    assert r.status_code == 400, r.text
    assert any(i["code"] == "duplicate" for i in r.json()["issue"])
    assert history_total(client) == before
    assert read(client, "Patient/twice")["meta"]["versionId"] == "1"
    assert client.get("/fhir/Patient/fresh").status_code == 404


def test_same_full_url_twice_fails_the_transaction(client):
    dup = urn()
    r = post(
        client,
        [entry("POST", "Patient", patient("a"), dup), entry("POST", "Patient", patient("b"), dup)],
    )
    assert r.status_code == 400, r.text
    assert names_entry(r.json(), 1)
    assert total(client, "Patient") == 0


# ---------------------------------------------------------------- the response
def test_transaction_response_lists_outcomes_in_request_order(client):
    put(client, patient("upd", id="upd"))
    put(client, patient("del", id="del"))
    put(client, patient("pat", id="pat"))
    r = post(
        client,
        [
            entry("PATCH", "Patient/pat", [{"op": "add", "path": "/active", "value": False}]),
            entry("GET", "Patient/upd"),
            entry("PUT", "Patient/upd", patient("upd", id="upd", active=True)),
            entry("DELETE", "Patient/del"),
            entry("POST", "Patient", patient("new")),
            entry("PUT", "Patient/brand-new", patient("brand-new", id="brand-new")),
        ],
    )
    body = ok(r)
    assert r.headers["content-type"].startswith(FHIR)
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "transaction-response"
    patched, got, updated, deleted, created, put_created = body["entry"]
    base = "http://hie.test/fhir"

    assert patched["response"]["status"] == "200 OK"
    assert patched["response"]["etag"] == 'W/"2"'
    assert patched["resource"]["active"] is False
    assert patched["fullUrl"] == f"{base}/Patient/pat"

    assert got["response"]["status"] == "200 OK"
    assert got["resource"] == updated["resource"]  # the GET ran after the PUT

    assert updated["response"]["status"] == "200 OK"
    assert updated["response"]["etag"] == 'W/"2"'
    assert updated["resource"]["meta"]["versionId"] == "2"
    assert updated["response"]["lastModified"] == updated["resource"]["meta"]["lastUpdated"]

    assert deleted["response"]["status"].startswith("204")
    assert "resource" not in deleted

    for e, expected_id in ((created, None), (put_created, "brand-new")):
        assert e["response"]["status"] == "201 Created"
        assert e["response"]["etag"] == 'W/"1"'
        type_, id_, history, version = e["response"]["location"].split("/")
        assert (type_, history, version) == ("Patient", "_history", "1")
        assert id_ == e["resource"]["id"]
        assert expected_id in (None, id_)
        assert e["fullUrl"] == f"{base}/Patient/{id_}"
        assert client.get(f"/fhir/{e['response']['location']}").json() == e["resource"]

    assert read(client, "Patient/pat")["active"] is False
    assert client.get("/fhir/Patient/del").status_code == 410


def test_prefer_return_minimal_omits_resources(client):
    put(client, patient("m", id="m"))
    r = post(
        client,
        [
            entry("POST", "Patient", patient("min")),
            entry("PUT", "Patient/m", patient("m", id="m", active=True)),
        ],
        headers={"Prefer": "return=minimal"},
    )
    body = ok(r)
    created, updated = body["entry"]
    for e in body["entry"]:
        assert "resource" not in e
        assert e["response"]["etag"]
    assert created["response"]["status"] == "201 Created"
    assert created["response"]["location"].endswith("/_history/1")
    assert updated["response"]["status"] == "200 OK"
    assert updated["response"]["etag"] == 'W/"2"'
    assert read(client, f"Patient/{id_of(created)}")["identifier"][0]["value"] == "min"
    assert read(client, "Patient/m")["active"] is True


def test_prefer_return_operation_outcome(client):
    body = ok(
        post(
            client,
            [entry("POST", "Patient", patient("oo"))],
            headers={"Prefer": "return=OperationOutcome"},
        )
    )
    (e,) = body["entry"]
    assert "resource" not in e
    assert e["response"]["status"] == "201 Created"
    assert e["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert total(client, "Patient", value="oo") == 1


def test_empty_transaction(client):
    body = ok(client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction"}))
    assert body["type"] == "transaction-response"
    assert body["entry"] == []


# ---------------------------------------------------------------- batch
def test_batch_entries_succeed_or_fail_independently(client):
    put(client, patient("b", id="b"))
    r = post(
        client,
        [
            entry("POST", "Patient", patient("b0")),
            entry("POST", "Patient", patient("b1", birthDate="not-a-date")),
            entry("POST", "Patient", patient("b2")),
            entry("PUT", "Patient/b", patient("b", id="b", active=True), ifMatch='W/"7"'),
            entry("GET", "Patient/missing"),
            entry("POST", "Observation", observation("b5")),
            entry("POST", "Patient", observation("b6")),
        ],
        kind="batch",
    )
    body = ok(r)
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses[0] == statuses[2] == statuses[5] == "201 Created"
    assert statuses[1].split()[0] == "422"
    assert statuses[3].split()[0] == "412"
    assert statuses[4].split()[0] == "404"
    assert statuses[6].split()[0] == "400"
    for i in (1, 3, 4, 6):
        failed = body["entry"][i]
        assert "resource" not in failed
        assert failed["response"]["outcome"]["resourceType"] == "OperationOutcome"
        assert failed["response"]["outcome"]["issue"][0]["severity"] == "error"
    assert "Patient.birthDate" in str(body["entry"][1]["response"]["outcome"])
    for i in (0, 2, 5):
        e = body["entry"][i]
        assert read(client, e["response"]["location"].split("/_history")[0]) == e["resource"]
    assert total(client, "Patient") == 2 + 1  # b0, b2 and b (from before)
    assert total(client, "Observation") == 1
    assert "active" not in read(client, "Patient/b")


def test_batch_get_entries(client):
    p = put(client, patient("g", id="g"))
    put(client, patient("g", id="g", active=True))
    create(client, patient("g2"))
    body = ok(
        post(
            client,
            [
                entry("GET", "Patient/g"),
                entry("GET", f"Patient?identifier={SYS}|&_tag:not={MEMBERS['_tag:not']}"),
                entry("GET", "Patient/g/_history/1"),
                entry("GET", "Patient/g/_history"),
                entry("GET", "Patient?_id=g&_count=1"),
                entry("GET", "Patient/nope"),
            ],
            kind="batch",
        )
    )
    assert body["type"] == "batch-response"
    read_e, search_e, vread_e, history_e, by_id, missing = body["entry"]
    assert read_e["response"]["status"] == "200 OK"
    assert read_e["response"]["etag"] == 'W/"2"'
    assert read_e["resource"]["active"] is True
    assert search_e["resource"]["type"] == "searchset"
    assert search_e["resource"]["total"] == 2
    assert vread_e["resource"] == p
    assert history_e["resource"]["type"] == "history"
    assert history_e["resource"]["total"] == 2
    assert [e["resource"]["id"] for e in by_id["resource"]["entry"]] == ["g"]
    assert missing["response"]["status"].startswith("404")
    assert "outcome" in missing["response"]


def test_batch_does_not_roll_back_what_succeeded(client):
    r = post(
        client,
        [
            entry("PUT", "Patient/x", patient("x", id="x")),
            entry("PUT", "Patient/x", patient("x", id="x", active=True)),
            entry("PUT", "Patient/y", patient("y", id="y"), ifMatch='W/"1"'),
        ],
        kind="batch",
    )
    body = ok(r)
    assert [e["response"]["status"].split()[0] for e in body["entry"]] == ["201", "200", "412"]
    assert read(client, "Patient/x")["meta"]["versionId"] == "2"
    assert client.get("/fhir/Patient/y").status_code == 404


# ---------------------------------------------------------------- bad input
GOOD = entry("POST", "Patient", patient("never"))
BAD_BUNDLES = {
    "not a Bundle": (patient("never"), None),
    "collection": ({"resourceType": "Bundle", "type": "collection", "entry": [GOOD]}, None),
    "no type": ({"resourceType": "Bundle", "entry": [GOOD]}, None),
    "searchset": ({"resourceType": "Bundle", "type": "searchset", "entry": [GOOD]}, None),
    "entry not an array": (
        {"resourceType": "Bundle", "type": "transaction", "entry": GOOD},
        None,
    ),
    "entry without request": (bundle([GOOD, {"resource": patient("never")}]), 1),
    "request without url": (bundle([GOOD, {"request": {"method": "GET"}}]), 1),
    "unknown method": (bundle([GOOD, entry("FROB", "Patient", patient("never"))]), 1),
    "lowercase method": (bundle([GOOD, entry("post", "Patient", patient("never"))]), 1),
    "POST without resource": (bundle([GOOD, entry("POST", "Patient")]), 1),
    "bad url": (bundle([GOOD, entry("GET", "Patient/1/2/3/4/5")]), 1),
    "bad ifMatch": (bundle([GOOD, entry("DELETE", "Patient/x", ifMatch="yesterday")]), 1),
    "bad ifMatch in batch": (
        bundle([GOOD, entry("DELETE", "Patient/x", ifMatch="yesterday")], "batch"),
        1,
    ),
}


@pytest.mark.parametrize("name", list(BAD_BUNDLES))
def test_bad_bundles_are_refused_with_400(client, name):
    payload, index = BAD_BUNDLES[name]
    r = client.post("/fhir", json=payload)
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    if index is not None:
        assert names_entry(r.json(), index), r.json()
    assert total(client, "Patient") == 0


def test_malformed_json_is_400(client):
    r = client.post("/fhir", content=b'{"resourceType": "Bundle", "type": "transaction",')
    assert r.status_code == 400
    assert r.json()["issue"][0]["code"] == "invalid"
    assert client.post("/fhir", content=b"").status_code == 400


@pytest.mark.parametrize("ctype", ["text/plain", "application/fhir+xml", "application/xml", None])
def test_wrong_content_type_is_415(client, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    content = b'{"resourceType": "Bundle", "type": "transaction", "entry": []}'
    if ctype is None:
        client.headers.pop("Content-Type")
    r = client.post("/fhir", content=content, headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("ctype", ["application/json", "application/fhir+json; charset=utf-8"])
def test_json_content_types_are_accepted(client, ctype):
    r = client.post(
        "/fhir",
        content=b'{"resourceType": "Bundle", "type": "batch", "entry": []}',
        headers={"Content-Type": ctype},
    )
    assert ok(r)["type"] == "batch-response"


def test_bundle_over_the_body_limit_is_413(client):
    big = [entry("POST", "Patient", patient("x" * 1000)) for _ in range(3000)]  # > 2 MiB
    r = post(client, big)
    assert r.status_code == 413
    assert total(client, "Patient") == 0


def test_unresolved_urn_uuid_reference_fails_the_transaction(client):
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "identifier": [{"system": SYS, "value": "dangling"}],
        "subject": {"reference": "urn:uuid:0b2c6f0e-1111-4222-8333-944455556666"},
    }
    r = post(client, [entry("POST", "Observation", obs)])
    assert r.status_code == 400
    issue = r.json()["issue"][0]
    assert "Bundle.entry[0]" in issue["diagnostics"] and "urn:uuid:0b2c" in issue["diagnostics"]
    assert total(client, "Observation", value="dangling") == 0
