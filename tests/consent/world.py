"""A small fixed world for the consent tests, and the callers that look at it.

Organisations ``a`` (hospital), ``b`` and ``c`` (clinics). One person registered at A
(``PA``) and at B (``PB``): the same resident ID, name and birth date, so the MPI links
both to one golden record (``G``). An unrelated patient ``Q`` registered at C (golden
record ``GQ``). Data (writer, patient, date, labels):

=====  ======  =======================  ==========  =====================
key    writer  about                    date        meta.security
=====  ======  =======================  ==========  =====================
oa1    A       PA                       2020-03-01  -
oa2    A       PA                       2021-05-05  v3-ActCode HIV
ob1    B       PB                       2019-06-01  v3-Confidentiality N
ob2    B       PB                       2022-02-02  v3-ActCode PSY
ob3    B       PB                       2023-03-03  PSY + v3-Confidentiality R
ox     B       subject Q, performer PB  2024-01-01  -
oq1    C       Q                        2021-01-01  -
cb     B       PB (Condition)           onset 2018  -
ea     A       PA (Encounter)           2017        -
=====  ======  =======================  ==========  =====================

``ox`` concerns both people (Observation.performer is in the Patient compartment).
Consents are written from compact dicts (:func:`consent_resource`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi.testclient import TestClient

from hie.mpi import RESIDENT_ID_SYSTEM, gb11643_check_digit
from hie.mpi.records import ENTERPRISE_ID_SYSTEM, golden_of_member
from tests.conftest import FHIR

ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACTREASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
LOINC = "http://loinc.org"
GOLDEN = "http://hie.example/fhir/CodeSystem/mpi|golden-record"
NOT_GOLDEN = {"_tag:not": GOLDEN}
BTG = {"system": ACTREASON, "code": "BTG"}

MRN_A = "http://hospital-a.example/mrn"
MRN_B = "http://clinic-b.example/mrn"
MRN_C = "http://clinic-c.example/mrn"
PERSON_ID = "11010519491231002X"

LABELS = {
    "HIV": {"system": ACTCODE, "code": "HIV"},
    "PSY": {"system": ACTCODE, "code": "PSY"},
    "R": {"system": CONFIDENTIALITY, "code": "R"},
    "N": {"system": CONFIDENTIALITY, "code": "N"},
}

#: The keys of the world's member resources (golden records and Consents aside).
WORLD = ("PA", "PB", "Q", "oa1", "oa2", "ob1", "ob2", "ob3", "ox", "oq1", "cb", "ea")
#: What the person's ``$everything`` covers (of :data:`WORLD`).
PERSON = frozenset({"PA", "PB", "oa1", "oa2", "ob1", "ob2", "ob3", "ox", "cb", "ea"})
#: Types searched to see what a caller sees.
SEARCHED = {"Patient": NOT_GOLDEN, "Observation": {}, "Condition": {}, "Encounter": {}}


def resident_id(birth: str, seq: int, area: str = "110105") -> str:
    first17 = f"{area}{birth.replace('-', '')}{seq:03d}"
    return first17 + gb11643_check_digit(first17)


assert resident_id("1949-12-31", 2) == PERSON_ID


def person_at(mrn_system: str, mrn: str) -> dict:
    """The person (王芳, 1949-12-31) as a member registers her."""
    return {
        "resourceType": "Patient",
        "identifier": [
            {"system": mrn_system, "value": mrn},
            {"system": RESIDENT_ID_SYSTEM, "value": PERSON_ID},
        ],
        "name": [{"use": "official", "family": "王", "given": ["芳"]}],
        "gender": "female",
        "birthDate": "1949-12-31",
    }


STRANGER = {
    "resourceType": "Patient",
    "identifier": [
        {"system": MRN_C, "value": "C-1"},
        {"system": RESIDENT_ID_SYSTEM, "value": resident_id("1975-01-02", 21)},
    ],
    "name": [{"use": "official", "family": "李", "given": ["四"]}],
    "gender": "male",
    "birthDate": "1975-01-02",
}

#: Token claims of each caller.
CALLERS: dict[str, dict] = {
    "a": {"client": "emr-a", "organization": "Organization/a"},
    "b": {"client": "emr-b", "organization": "Organization/b"},
    "c": {"client": "emr-c", "organization": "Organization/c"},
    "c-dr": {
        "client": "emr-c-dr",
        "organization": "Organization/c",
        "user": "Practitioner/dr-c",
        "user_role": "PractitionerRole/pr-c",
    },
    "c-reader": {
        "client": "emr-c-reader",
        "organization": "Organization/c",
        "scope": "system/*.rs",
    },
    "er-a": {
        "client": "er-a",
        "organization": "Organization/a",
        "scope": "system/*.rs",
        "break_glass": True,
    },
    "admin": {"client": "ops", "roles": ("admin",)},
    "auditor": {"client": "audit-office", "roles": ("auditor",), "scope": "system/AuditEvent.rs"},
}


def provision(world: World, p: dict) -> dict:
    """A Consent.provision from its compact form (see module docs of test_scenarios)."""
    out: dict = {}
    if "type" in p:
        out["type"] = p["type"]
    if "period" in p:
        out["period"] = _period(p["period"])
    if "actor" in p:
        out["actor"] = [
            {
                "role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]},
                "reference": {"reference": world.ref(r)},
            }
            for r in p["actor"]
        ]
    if "action" in p:
        out["action"] = [{"coding": [{"system": CONSENT_ACTION, "code": c}]} for c in p["action"]]
    if "label" in p:
        out["securityLabel"] = [LABELS[x] if isinstance(x, str) else x for x in p["label"]]
    if "purpose" in p:
        out["purpose"] = [
            {"system": ACTREASON, "code": x} if isinstance(x, str) else x for x in p["purpose"]
        ]
    if "class" in p:
        out["class"] = [
            {"system": RESOURCE_TYPES, "code": x} if isinstance(x, str) else x for x in p["class"]
        ]
    if "dataPeriod" in p:
        out["dataPeriod"] = _period(p["dataPeriod"])
    if "data" in p:
        out["data"] = [
            {"meaning": meaning, "reference": {"reference": world.ref(r)}}
            for meaning, r in p["data"]
        ]
    out.update(p.get("raw", {}))
    if "provision" in p:
        out["provision"] = [provision(world, n) for n in p["provision"]]
    return out


def _period(value: tuple) -> dict:
    start, end = value
    return {k: v for k, v in (("start", start), ("end", end)) if v is not None}


def consent_resource(world: World, spec: dict) -> dict:
    """A Consent from a compact spec: ``patient`` (world key, default PB), ``status``
    (active), ``scope`` (patient-privacy), ``policy`` (v3-ActCode policyRule code; by
    default OPTIN/OPTOUT after the root type; None for none), ``provision``."""
    body: dict = {
        "resourceType": "Consent",
        "status": spec.get("status", "active"),
        "scope": {
            "coding": [{"system": CONSENT_SCOPE, "code": spec.get("scope", "patient-privacy")}]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "dateTime": "2024-06-01T08:00:00Z",
    }
    if spec.get("patient", "PB") is not None:
        body["patient"] = {"reference": world.ref(spec.get("patient", "PB"))}
    root = spec.get("provision")
    policy = spec.get("policy", "default")
    if policy == "default":
        policy = {"permit": "OPTIN", "deny": "OPTOUT"}.get((root or {}).get("type"))
    if policy:
        body["policyRule"] = {"coding": [{"system": ACTCODE, "code": policy}]}
    if root is not None:
        body["provision"] = provision(world, root)
    return body


def nested(depth: int, leaf_type: str = "permit") -> dict:
    """A provision ``depth`` levels deep (the root counts as one), alternating types."""
    node: dict = {"type": leaf_type}
    for level in range(depth - 1):
        node = {"type": "deny" if level % 2 == 0 else "permit", "provision": [node]}
    return node


@dataclass
class World:
    http: TestClient
    app: object
    ids: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ callers
    def token(self, who: str) -> str:
        if who not in self._tokens:
            spec = dict(CALLERS[who])
            client = spec.pop("client")
            scope = spec.pop("scope", "system/*.cruds")
            roles = spec.pop("roles", ("member",))
            self._tokens[who] = self.app.state.tokens.mint(client, scope, 600, roles=roles, **spec)
        return self._tokens[who]

    def headers(self, who: str | None, purpose: str | None = None) -> dict[str, str]:
        h = {"Content-Type": FHIR}
        if who is not None:
            h["Authorization"] = f"Bearer {self.token(who)}"
        if purpose:
            h["X-Purpose-Of-Use"] = purpose
        return h

    def request(self, who, method, url, *, purpose=None, headers=None, **kw):
        hdrs = {**self.headers(who, purpose), **(headers or {})}
        return self.http.request(method, url, headers=hdrs, **kw)

    def get(self, who, url, **kw):
        return self.request(who, "GET", url, **kw)

    def post(self, who, url, **kw):
        return self.request(who, "POST", url, **kw)

    def put(self, who, url, **kw):
        return self.request(who, "PUT", url, **kw)

    def delete(self, who, url, **kw):
        return self.request(who, "DELETE", url, **kw)

    # ------------------------------------------------------------------ keys
    def ref(self, key: str) -> str:
        """``Type/id`` of a world key (a literal reference is returned as is)."""
        if key in self.ids:
            return f"{self.types[key]}/{self.ids[key]}"
        return key

    def url(self, key: str) -> str:
        return "/fhir/" + self.ref(key)

    def key(self, resource: dict) -> str:
        """The world key of a returned resource (``?Type/id`` if it is none)."""
        for k, i in self.ids.items():
            if i == resource.get("id") and self.types[k] == resource.get("resourceType"):
                return k
        return f"?{resource.get('resourceType')}/{resource.get('id')}"

    def keys(self, bundle: dict, mode: str | None = "match") -> set[str]:
        return {
            self.key(e["resource"])
            for e in bundle.get("entry", [])
            if "resource" in e
            and (mode is None or e.get("search", {}).get("mode", "match") == mode)
        }

    # ------------------------------------------------------------------ writes
    def write(self, key: str, who: str, resource: dict) -> dict:
        r = self.post(who, f"/fhir/{resource['resourceType']}", json=resource)
        assert r.status_code == 201, r.text
        body = r.json()
        self.ids[key], self.types[key] = body["id"], body["resourceType"]
        return body

    def put_fixed(self, resource: dict) -> None:
        r = self.put("admin", f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
        assert r.status_code in (200, 201), r.text

    def consent(self, spec: dict, key: str | None = None) -> str:
        """Write the Consent of ``spec`` (by member ``spec['by']``, default b); its id."""
        key = key or f"consent{sum(1 for k in self.types.values() if k == 'Consent') + 1}"
        body = self.write(key, spec.get("by", "b"), consent_resource(self, spec))
        return body["id"]

    def build(self) -> World:
        for org, name in (("a", "Hospital A"), ("b", "Clinic B"), ("c", "Clinic C")):
            self.put_fixed(
                {"resourceType": "Organization", "id": org, "name": name, "active": True}
            )
        self.put_fixed({"resourceType": "Practitioner", "id": "dr-c", "name": [{"family": "赵"}]})
        self.put_fixed(
            {
                "resourceType": "PractitionerRole",
                "id": "pr-c",
                "active": True,
                "practitioner": {"reference": "Practitioner/dr-c"},
                "organization": {"reference": "Organization/c"},
            }
        )
        self.put_fixed(
            {
                "resourceType": "CareTeam",
                "id": "ct-c",
                "status": "active",
                "participant": [
                    {"member": {"reference": "Organization/c"}},
                    {"member": {"reference": "PractitionerRole/pr-c"}},
                ],
                "managingOrganization": [{"reference": "Organization/c"}],
            }
        )
        pa = self.write("PA", "a", person_at(MRN_A, "A-1"))
        pb = self.write("PB", "b", person_at(MRN_B, "B-1"))
        q = self.write("Q", "c", STRANGER)
        pa = self.get("admin", self.url("PA")).json()
        pb = self.get("admin", self.url("PB")).json()
        q = self.get("admin", self.url("Q")).json()
        golden = golden_of_member(pa)
        assert golden is not None and golden_of_member(pb) == golden, "the MPI must link PA and PB"
        self.ids["G"], self.types["G"] = golden, "Patient"
        self.ids["GQ"], self.types["GQ"] = golden_of_member(q), "Patient"
        assert self.ids["GQ"] not in (None, golden)

        def obs(key, who, subject, when, code, labels=(), **extra):
            body = {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": self.ref(subject)},
                "effectiveDateTime": when,
                **extra,
            }
            if labels:
                body["meta"] = {"security": [LABELS[x] for x in labels]}
            self.write(key, who, body)

        obs("oa1", "a", "PA", "2020-03-01", "8867-4")
        obs("oa2", "a", "PA", "2021-05-05", "75622-1", ("HIV",))
        obs("ob1", "b", "PB", "2019-06-01", "8480-6", ("N",))
        obs("ob2", "b", "PB", "2022-02-02", "44249-1", ("PSY",))
        obs("ob3", "b", "PB", "2023-03-03", "11488-4", ("PSY", "R"))
        obs("ox", "b", "Q", "2024-01-01", "8310-5", performer=[{"reference": self.ref("PB")}])
        obs("oq1", "c", "Q", "2021-01-01", "2339-0")
        self.write(
            "cb",
            "b",
            {
                "resourceType": "Condition",
                "subject": {"reference": self.ref("PB")},
                "code": {"text": "hypertension"},
                "onsetDateTime": "2018-04-04",
            },
        )
        self.write(
            "ea",
            "a",
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"system": ACTCODE, "code": "AMB"},
                "subject": {"reference": self.ref("PA")},
                "period": {"start": "2017-07-07T09:00:00Z", "end": "2017-07-07T10:00:00Z"},
            },
        )
        return self

    # ------------------------------------------------------------------ looking
    def search_keys(self, who: str, purpose: str | None = None) -> set[str]:
        """The world resources ``who`` finds searching each type of :data:`SEARCHED`."""
        found: set[str] = set()
        for type_, extra in SEARCHED.items():
            r = self.get(who, f"/fhir/{type_}", purpose=purpose, params={"_count": "100", **extra})
            assert r.status_code == 200, r.text
            found |= self.keys(r.json())
        return found

    def read_keys(self, who: str, purpose: str | None = None, keys=WORLD) -> set[str]:
        """The world resources ``who`` can read (the others must be refused by consent)."""
        seen = set()
        for k in keys:
            r = self.get(who, self.url(k), purpose=purpose)
            if r.status_code == 200:
                assert r.json()["id"] == self.ids[k]
                seen.add(k)
            else:
                assert_withheld(r, k)
        return seen

    def events(self, **params) -> list[dict]:
        """AuditEvents (auditor) matching ``params``, following next links."""
        out: list[dict] = []
        url, query = "/fhir/AuditEvent", {"_count": "100"} | params
        while url:
            r = self.get("auditor", url, params=query)
            assert r.status_code == 200, r.text
            page = r.json()
            out += [e["resource"] for e in page.get("entry", [])]
            nxt = [link["url"] for link in page.get("link", []) if link["relation"] == "next"]
            url, query = (nxt[0], None) if nxt else (None, None)
        return out


def assert_withheld(response, what="") -> None:
    """403 OperationOutcome ``forbidden`` whose diagnostics mention consent."""
    assert response.status_code == 403, (what, response.status_code, response.text[:300])
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", what
    issue = body["issue"][0]
    assert issue["code"] == "forbidden", (what, issue)
    assert "consent" in (issue.get("diagnostics") or "").lower(), (what, issue)


def consent_entities(event: dict) -> list[dict]:
    """The Security Resource entities (type 2, role 13) of an AuditEvent."""
    return [
        e
        for e in event.get("entity", [])
        if e.get("type", {}).get("code") == "2"
        and e.get("type", {}).get("system", ENTITY_TYPE) == ENTITY_TYPE
        and e.get("role", {}).get("code") == "13"
        and e.get("role", {}).get("system", OBJECT_ROLE) == OBJECT_ROLE
    ]


def next_url(bundle: dict) -> str | None:
    return next((x["url"] for x in bundle.get("link", []) if x["relation"] == "next"), None)


def security(resource: dict) -> list[dict]:
    return [
        {"system": s.get("system"), "code": s.get("code")}
        for s in (resource.get("meta") or {}).get("security", [])
    ]


def enterprise_ids(identifiers) -> set:
    """The enterprise ids (the MPI's) among ``(system, value)`` pairs."""
    return {i for i in identifiers if i[0] == ENTERPRISE_ID_SYSTEM}
