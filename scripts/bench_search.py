#!/usr/bin/env python
"""Search latency of the HIE FHIR API on the embedded store, at growing data sizes.

For each size (``--sizes``, default 10k,100k,1m resources) a data directory is filled
with a synthetic alliance: ~50 Organizations, Patients (a tenth of the resources;
Chinese names with and without pinyin, Latin names, an MRN, birth date, gender, a
managing Organization) and Observations (the rest, ~9 a Patient: LOINC codes of
realistic frequency, one of them rare; effectiveDateTime over ten years; UCUM
quantities). The loader goes through HIE's own write path in-process but not HTTP:
``FhirService.new_write`` builds each ``Write`` with its index rows and
``SqliteStore.commit`` stores 2,000 of them per transaction, with
``synchronous=OFF`` and a 1 GiB page cache on the loading connection (only the load
uses these; the server runs with its defaults). The data directory is kept under
``--cache-dir``; ``--reuse`` skips loading when a directory was built by the same
generator, seed, search-parameter registry and store schema.

Then the database files are read once into the OS page cache (``--no-prewarm`` skips
it), ``hie serve`` runs on that directory (auth on, a token from ``hie token``) and
every query shape of the mix is sent ``--runs`` times, one request at a time over a
keep-alive connection, after a warm-up (a slow shape stops after ``--max-seconds``
once it has ``--min-runs``). Each query request is followed by the
baseline, ``GET /fhir/Patient/{id}`` of a random Patient, so both see the same
machine state; the report gives both latencies and their ratio. Every answer is
checked against the generated data (the identifier search returns exactly that
Patient, totals equal the true counts, sorts are in order, ...), so a broken query
cannot pass for a fast one. Afterwards, with the server stopped, the same queries run
in-process: through ``FhirService.search`` (what the HTTP route calls: ids, paging
snapshot, total, reading the page, includes; no HTTP, JSON or auth) and as one
``SqliteStore.match_ids`` for just the page's ids, to show where the time goes.

``--consent`` measures the consent engine instead (issue 6), on a data directory of
its own: the same alliance plus a member tag on every resource, sensitive security
labels on 3% of the Observations, one Consent for ~5% of the Patients and a heavy
patient with 300 more Observations and 50 Consents with nested provisions (see
:class:`ConsentPlan`). A member client of one Organization (``hie client add``, token
from ``hie token --client``, purpose TREAT) runs the consent shapes against the server
with ``HIE_CONSENT=off`` and ``on`` (phases off, on, on, off on the same data
directory); :class:`ConsentPolicy` computes from the generated Consents what the caller
may see, and every answer is checked against it (no withheld resource returned, page
sizes and totals equal to the visible counts, a withheld read 403). The report gives
each shape's latency with consent off and on and their ratio (target: at most 1.3×).

Output: Markdown on stdout (a table per size, then the growth of p95 with the data
size against the 50 ms target), also when interrupted; ``--json PATH`` writes every
figure and ``--from-json PATH`` prints its report again; progress on stderr.
Examples::

    .venv/bin/python scripts/bench_search.py --sizes 10k --runs 20       # smoke, ~1 min
    .venv/bin/python scripts/bench_search.py --sizes 10k,100k,1m --reuse  # the full run
    .venv/bin/python scripts/bench_search.py --consent --sizes 10k,100k --reuse --runs 200
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import datetime as dt
import hashlib
import itertools
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from bench_common import (
    CATEGORY_SYSTEM,
    FHIR_JSON,
    HOST,
    Server,
    ascending_sizes,
    clean_env,
    fmt_ms,
    free_port,
    hie_executable,
    log,
    machine_busy_seconds,
    machine_info,
    mark_index_current,
    percentile,
    run_async,
    wait_idle,
)

GENERATOR_VERSION = 1  # bump when the generated data changes (invalidates caches)
BATCH = 2000
TARGET_MS = 50.0
LOG_GROWTH = 2.0  # p95 growth over the sizes measured that still counts as logarithmic
MRN_SYSTEM = "https://hie.example.cn/sid/mrn"
ORG_SYSTEM = "https://hie.example.cn/sid/org"
LOINC_SYSTEM = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


# --------------------------------------------------------------------------- data
def _words(text: str) -> list[str]:
    return text.split()


CITIES = [
    ("Beijing", "北京"),
    ("Shanghai", "上海"),
    ("Guangzhou", "广州"),
    ("Shenzhen", "深圳"),
    ("Hangzhou", "杭州"),
    ("Chengdu", "成都"),
    ("Wuhan", "武汉"),
    ("Nanjing", "南京"),
    ("Tianjin", "天津"),
    ("Chongqing", "重庆"),
]
HOSPITAL_KINDS = [
    ("First People's Hospital", "市第一人民医院"),
    ("Second People's Hospital", "市第二人民医院"),
    ("Children's Hospital", "市儿童医院"),
    ("Hospital of Traditional Chinese Medicine", "市中医医院"),
    ("Maternal and Child Health Hospital", "市妇幼保健院"),
]
# (surname, pinyin, weight ~ frequency in China, percent)
SURNAMES = [
    ("王", "Wang", 7.1),
    ("李", "Li", 7.0),
    ("张", "Zhang", 6.7),
    ("刘", "Liu", 5.4),
    ("陈", "Chen", 4.5),
    ("杨", "Yang", 3.1),
    ("黄", "Huang", 2.2),
    ("赵", "Zhao", 2.0),
    ("吴", "Wu", 2.0),
    ("周", "Zhou", 1.9),
    ("徐", "Xu", 1.5),
    ("孙", "Sun", 1.5),
    ("马", "Ma", 1.4),
    ("朱", "Zhu", 1.3),
    ("胡", "Hu", 1.3),
    ("郭", "Guo", 1.1),
    ("何", "He", 1.1),
    ("林", "Lin", 1.0),
    ("高", "Gao", 1.0),
    ("罗", "Luo", 0.9),
    ("欧阳", "Ouyang", 0.1),
    ("司马", "Sima", 0.05),
]
GIVEN_CN = [
    ("伟", "Wei"),
    ("芳", "Fang"),
    ("娜", "Na"),
    ("秀英", "Xiuying"),
    ("敏", "Min"),
    ("静", "Jing"),
    ("丽", "Li"),
    ("强", "Qiang"),
    ("磊", "Lei"),
    ("军", "Jun"),
    ("洋", "Yang"),
    ("勇", "Yong"),
    ("艳", "Yan"),
    ("杰", "Jie"),
    ("娟", "Juan"),
    ("涛", "Tao"),
    ("明", "Ming"),
    ("超", "Chao"),
    ("秀兰", "Xiulan"),
    ("霞", "Xia"),
    ("平", "Ping"),
    ("刚", "Gang"),
    ("建华", "Jianhua"),
    ("志强", "Zhiqiang"),
    ("晓明", "Xiaoming"),
    ("海燕", "Haiyan"),
    ("子涵", "Zihan"),
    ("浩然", "Haoran"),
    ("梓萱", "Zixuan"),
    ("宇轩", "Yuxuan"),
]
GIVEN_LATIN = _words(
    "Anna Ben Chloe David Emma Farid Grace Hiro Ines Jonas Kofi Lena Mateo Nora Omar Priya "
    "Quinn Rosa Sven Tara Ulrich Vera William Xenia Yusuf Zoe Amelie Bruno Clara Dmitri "
    "Elif Felix Greta Hannah Ivan Julia Karim Luca Maria Niklas Olga Pablo Sofia Theo"
)
FAMILY_LATIN = _words(
    "Schmidt Okafor García Nguyen Jensen Kowalski Rossi Tanaka Müller Dubois Haddad Novak "
    "Silva Ivanova Larsen Cohen Fischer Becker Smith Johnson Brown Martin Bernard Moreau "
    "López Fernández Costa Santos Andersson Nielsen Virtanen Horvat Popescu Papadopoulos "
    "Yilmaz Kaya Öztürk Schneider Weber Meyer Wagner Hoffmann Schulz Koch Richter Klein"
)
# (LOINC code, display, UCUM unit, mean, sd, decimals, category, weight %)
CODES = [
    ("8867-4", "Heart rate", "/min", 74, 12, 0, "vital-signs", 11),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 124, 15, 0, "vital-signs", 11),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 79, 10, 0, "vital-signs", 11),
    ("8310-5", "Body temperature", "Cel", 36.8, 0.4, 1, "vital-signs", 8),
    ("29463-7", "Body weight", "kg", 68, 14, 1, "vital-signs", 8),
    ("8302-2", "Body height", "cm", 166, 9, 1, "vital-signs", 4),
    ("59408-5", "Oxygen saturation by pulse oximetry", "%", 97, 1.5, 0, "vital-signs", 7),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 98, 18, 0, "laboratory", 5),
    ("15074-8", "Glucose [Moles/volume] in Blood", "mmol/L", 5.6, 1.3, 1, "laboratory", 6),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 14, 1.4, 1, "laboratory", 5),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.95, 0.2, 2,
     "laboratory", 3),
    ("14682-9", "Creatinine [Moles/volume] in Serum or Plasma", "umol/L", 80, 18, 0,
     "laboratory", 4),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 4.2, 0.4, 1,
     "laboratory", 5),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 140, 3, 0,
     "laboratory", 5),
    ("14647-2", "Cholesterol [Moles/volume] in Serum or Plasma", "mmol/L", 4.8, 1.0, 1,
     "laboratory", 3),
    ("94500-6", "SARS-CoV-2 RNA [Presence] in Respiratory specimen by NAA with probe "
     "detection", None, 0, 0, 0, "laboratory", 0.1),
]  # fmt: skip
RARE_CODE = "94500-6"
MOLAR = {"mmol/L": 1.0, "umol/L": 0.001}  # to mol/m3 (= mmol/L), for value-quantity
EFFECTIVE_FROM = dt.datetime(2015, 1, 1, tzinfo=dt.UTC)
EFFECTIVE_SPAN = 10 * 365 * 86_400
CHINA = dt.timezone(dt.timedelta(hours=8))


def fold(text: str) -> str:
    """Lower case without accents: how a string search value compares (ASCII, Latin
    and Han names; HIE's own folding does more, which these names do not need)."""
    decomposed = unicodedata.normalize("NFD", text.casefold())
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).split())


@dataclass
class Truth:
    """What was generated, to pick query arguments and check the answers."""

    orgs: list[tuple[str, str]] = field(default_factory=list)  # (id, name)
    patient_ids: list[str] = field(default_factory=list)
    mrn: list[str] = field(default_factory=list)
    org_of: array.array = field(default_factory=lambda: array.array("H"))
    birth: list[str] = field(default_factory=list)
    tokens: list[tuple[str, ...]] = field(default_factory=list)  # folded name parts
    cjk_family: list[str] = field(default_factory=list)  # "" for Latin names
    obs_ids: list[str] = field(default_factory=list)
    obs_patient: array.array = field(default_factory=lambda: array.array("l"))
    obs_code: array.array = field(default_factory=lambda: array.array("b"))
    obs_when: array.array = field(default_factory=lambda: array.array("d"))  # epoch s
    obs_mol: array.array = field(default_factory=lambda: array.array("d"))  # mmol/L or nan
    by_patient: list[list[int]] = field(default_factory=list)
    # --consent only:
    caller: int = -1  # the org index of the benchmark's member client
    heavy: int = -1  # the patient with many Consents
    obs_label: array.array = field(default_factory=lambda: array.array("b"))  # -1: none
    obs_writer: array.array = field(default_factory=lambda: array.array("H"))  # org index
    consents: dict[int, list[tuple[str, dict]]] = field(default_factory=dict)  # by patient

    def counts(self) -> dict[str, int]:
        counts = {
            "Organization": len(self.orgs),
            "Patient": len(self.patient_ids),
            "Observation": len(self.obs_ids),
        }
        if self.consents:
            counts["Consent"] = sum(len(c) for c in self.consents.values())
        return counts


class Generator:
    """The synthetic alliance, deterministic for a seed and size; yields resources
    while recording :class:`Truth`."""

    def __init__(self, seed: int, size: int, consent: bool = False):
        self.rng = random.Random(seed)
        self.size = size
        self.truth = Truth()
        #: --consent: member tags, security labels and Consents, from an RNG of their
        #: own (the rest of the data is the same as without it).
        self.plan = ConsentPlan(self, seed) if consent else None
        weights = [c[7] for c in CODES]
        self.code_cum = list(itertools.accumulate(weights))
        self.surname_cum = list(itertools.accumulate(s[2] for s in SURNAMES))

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def resources(self) -> Iterator[tuple[str, str, dict]]:
        """``(type, id, resource)`` in load order: Organizations, then each Patient
        followed by its Observations (with ``--consent``, then its Consents, if any)."""
        r, t, plan = self.rng, self.truth, self.plan
        n_orgs = min(50, max(1, self.size // 200))
        n_patients = max(1, (self.size - n_orgs) // 10)
        n_obs = self.size - n_orgs - n_patients
        if plan is not None:
            plan.begin(n_orgs)
        for i in range(n_orgs):
            item = self.organization(i)
            if plan is not None:
                plan.tag(item[2], i)
            yield item
        per_patient = [0] * n_patients
        for _ in range(n_obs):
            per_patient[r.randrange(n_patients)] += 1
        for n, count in enumerate(per_patient):
            item = self.patient(n, r.randrange(n_orgs))
            if plan is not None:
                plan.patient(item[2], n)
            yield item
            t.by_patient.append([])
            for _ in range(count):
                item = self.observation(n)
                if plan is not None:
                    plan.observation(item[2])
                yield item
            if plan is not None:
                yield from plan.after_patient(n)

    def organization(self, i: int) -> tuple[str, str, dict]:
        (city, city_cn), (kind, kind_cn) = CITIES[i % 10], HOSPITAL_KINDS[i // 10 % 5]
        name = f"{city} {kind}" + (f" {i // 50 + 1}" if i >= 50 else "")
        oid = self.uuid()
        self.truth.orgs.append((oid, name))
        return (
            "Organization",
            oid,
            {
                "resourceType": "Organization",
                "identifier": [{"system": ORG_SYSTEM, "value": f"ORG{i + 1:03d}"}],
                "active": True,
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                                "code": "prov",
                                "display": "Healthcare Provider",
                            }
                        ]
                    }
                ],
                "name": name,
                "alias": [city_cn + kind_cn],
                "address": [{"city": city, "country": "CN"}],
            },
        )

    def patient(self, n: int, org: int) -> tuple[str, str, dict]:
        r, t = self.rng, self.truth
        pid = self.uuid()
        mrn = f"MRN{n + 1:08d}"
        if r.random() < 0.6:  # a Chinese name, often with its pinyin as well
            k = bisect.bisect(self.surname_cum, r.random() * self.surname_cum[-1])
            family, family_py, _ = SURNAMES[min(k, len(SURNAMES) - 1)]
            given, given_py = r.choice(GIVEN_CN)
            names: list[dict] = [
                {"use": "official", "text": family + given, "family": family, "given": [given]}
            ]
            parts = [family, given, family + given]
            if r.random() < 0.7:
                names.append({"use": "usual", "family": family_py, "given": [given_py]})
                parts += [family_py, given_py]
            t.cjk_family.append(family)
        else:
            family = r.choice(FAMILY_LATIN)
            given_names = r.sample(GIVEN_LATIN, r.choice([1, 1, 2]))
            names = [{"use": "official", "family": family, "given": given_names}]
            parts = [family, *given_names]
            t.cjk_family.append("")
        born = dt.date(1930, 1, 1) + dt.timedelta(days=r.randrange(94 * 365))
        t.patient_ids.append(pid)
        t.mrn.append(mrn)
        t.org_of.append(org)
        t.birth.append(born.isoformat())
        t.tokens.append(tuple(dict.fromkeys(fold(p) for p in parts)))
        return (
            "Patient",
            pid,
            {
                "resourceType": "Patient",
                "identifier": [
                    {
                        "use": "usual",
                        "type": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                    "code": "MR",
                                }
                            ]
                        },
                        "system": MRN_SYSTEM,
                        "value": mrn,
                    }
                ],
                "active": True,
                "name": names,
                "telecom": [{"system": "phone", "value": f"+86 1{r.randrange(10**10):010d}"}],
                "gender": r.choice(["female", "male"]),
                "birthDate": born.isoformat(),
                "managingOrganization": {"reference": f"Organization/{t.orgs[org][0]}"},
            },
        )

    def observation(self, patient: int) -> tuple[str, str, dict]:
        r, t = self.rng, self.truth
        k = bisect.bisect(self.code_cum, r.random() * self.code_cum[-1])
        k = min(k, len(CODES) - 1)
        code, display, unit, mean, sd, decimals, category, _ = CODES[k]
        oid = self.uuid()
        seconds = r.randrange(EFFECTIVE_SPAN)
        when = EFFECTIVE_FROM + dt.timedelta(seconds=seconds)
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final" if r.random() < 0.9 else "amended",
            "category": [
                {
                    "coding": [
                        {
                            "system": CATEGORY_SYSTEM,
                            "code": category,
                            "display": category.replace("-", " ").title(),
                        }
                    ]
                }
            ],
            "code": {
                "coding": [{"system": LOINC_SYSTEM, "code": code, "display": display}],
                "text": display,
            },
            "subject": {"reference": f"Patient/{t.patient_ids[patient]}"},
            "effectiveDateTime": when.astimezone(CHINA).isoformat(),
        }
        mol = math.nan
        if unit is None:
            obs["valueCodeableConcept"] = {
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": "260415000",
                        "display": "Not detected",
                    }
                ]
            }
        else:
            value = round(max(0.0, r.gauss(mean, sd)), decimals)
            if decimals == 0:
                value = int(value)
            if unit in MOLAR:
                mol = value * MOLAR[unit]
            obs["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
        index = len(t.obs_ids)
        t.obs_ids.append(oid)
        t.obs_patient.append(patient)
        t.obs_code.append(k)
        t.obs_when.append(when.timestamp())
        t.obs_mol.append(mol)
        t.by_patient[patient].append(index)
        return "Observation", oid, obs


# --------------------------------------------------------------------------- consent data
CONSENT_VERSION = 1  # bump when the --consent additions change (invalidates caches)
MEMBER_TAG_SYSTEM = "http://hie.example/fhir/CodeSystem/member-organization"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
#: The labels the consent contract treats as sensitive (never shared by default).
SENSITIVE = frozenset(
    [(ACT_CODE, c) for c in _words(
        "BH COGN DVD EMOTDIS ETH ETHUD GDIS HIV MH MST OPIOIDUD PSY PSYTHPN SCA SDV SEX "
        "SPI STD SUD TBOO"
    )] + [(CONFIDENTIALITY, "R"), (CONFIDENTIALITY, "V")]
)  # fmt: skip
#: The sensitive labels the generator puts on Observations (one each at most).
LABELS = [(ACT_CODE, "HIV"), (ACT_CODE, "PSY"), (ACT_CODE, "SUD"), (ACT_CODE, "ETH"),
          (CONFIDENTIALITY, "R")]  # fmt: skip
NORMAL = (CONFIDENTIALITY, "N")  # a label that is not sensitive
SENSITIVE_SHARE = 0.03  # of the Observations
CONSENT_SHARE = 0.05  # of the Patients, one Consent each
HEAVY_OBS = 300  # extra Observations of the heavy patient
HEAVY_SENSITIVE = 0.1  # of those, labelled HIV or PSY
CALLER_ORG = 7  # org index of the member client the benchmark queries as
PURPOSE = "TREAT"
READ_ACTIONS = frozenset({"access", "use", "disclose"})


class ConsentPlan:
    """What ``--consent`` adds to the alliance: a member tag on every resource (the
    writer: mostly the patient's managing Organization), sensitive labels on a few
    Observations, one Consent for ~5% of the Patients (deny one member; deny
    Observations, some for a data period; permit one label to one member; deny all but
    one member, as root ``type`` or through ``policyRule``) and a *heavy* patient with
    300 more Observations and 50 Consents with nested provisions. The client measured
    is a member of Organization #7 (``truth.caller``), purpose TREAT."""

    def __init__(self, gen: Generator, seed: int):
        self.gen, self.t = gen, gen.truth
        self.rng = random.Random(seed * 7919 + 6)
        self.n_orgs = 0

    def begin(self, n_orgs: int) -> None:
        self.n_orgs = n_orgs
        self.t.caller = min(CALLER_ORG, n_orgs - 1)

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def other_org(self) -> int:
        """A random Organization that is not the caller's."""
        k = self.rng.randrange(self.n_orgs - 1)
        return k if k < self.t.caller else k + 1

    def tag(self, body: dict, writer: int, security: list[tuple[str, str]] = ()) -> None:
        meta = body.setdefault("meta", {})
        meta["tag"] = [{"system": MEMBER_TAG_SYSTEM, "code": self.t.orgs[writer][0]}]
        if security:
            meta["security"] = [{"system": s, "code": c} for s, c in security]

    def patient(self, body: dict, n: int) -> None:
        t = self.t
        self.tag(body, t.org_of[n])
        if t.heavy < 0 and t.org_of[n] != t.caller:
            t.heavy = n

    def observation(self, body: dict, heavy: bool = False) -> None:
        r, t = self.rng, self.t
        p = t.obs_patient[-1]
        if heavy:  # never written by the caller, so its Consents decide
            writer = t.org_of[p] if r.random() < 0.8 else self.other_org()
            label = r.randrange(2) if r.random() < HEAVY_SENSITIVE else -1
        else:
            writer = t.org_of[p] if r.random() < 0.8 else r.randrange(self.n_orgs)
            label = r.randrange(len(LABELS)) if r.random() < SENSITIVE_SHARE else -1
        security = [LABELS[label]] if label >= 0 else ([NORMAL] if r.random() < 0.2 else [])
        self.tag(body, writer, security)
        t.obs_label.append(label)
        t.obs_writer.append(writer)

    def after_patient(self, n: int) -> Iterator[tuple[str, str, dict]]:
        r, t = self.rng, self.t
        if n == t.heavy:
            yield from self.heavy_consents(n)
            gen, saved = self.gen, self.gen.rng
            gen.rng = r  # the extra Observations leave the main RNG alone
            try:
                for _ in range(HEAVY_OBS):
                    item = gen.observation(n)
                    self.observation(item[2], heavy=True)
                    yield item
            finally:
                gen.rng = saved
            return
        if r.random() >= CONSENT_SHARE:
            return
        labels = {t.obs_label[i] for i in t.by_patient[n]} - {-1}
        kind = "label" if labels and r.random() < 0.5 else r.choice(["org", "class", "all"])
        x = t.caller if r.random() < 0.5 else self.other_org()
        if kind == "org":  # deny everything to one member
            yield self.consent(
                n, self.prov("deny", actor=x, action="access" if r.random() < 0.3 else None)
            )
        elif kind == "class":  # deny Observations (to everyone), sometimes of a data period
            period = self.window(3 * 365) if r.random() < 0.5 else None
            yield self.consent(n, self.prov("deny", cls="Observation", period=period))
        elif kind == "label":  # permit one sensitive label to one member
            label = LABELS[r.choice(sorted(labels))]
            yield self.consent(n, self.prov("permit", actor=x, labels=[label], purpose=PURPOSE))
        elif r.random() < 0.5:  # deny all but one member (root type deny)
            yield self.consent(n, self.prov("deny", sub=[self.prov("permit", actor=x)]))
        else:  # the same through policyRule, the root without a type
            yield self.consent(n, self.prov(None, sub=[self.prov("permit", actor=x)]), "OPTOUT")

    def heavy_consents(self, n: int) -> Iterator[tuple[str, str, dict]]:
        """50 Consents; for the caller, Observations of some data periods are denied
        and HIV-labelled ones permitted (outside other periods). Every permit that can
        match the caller names the label it releases, so the decision is unambiguous."""
        c, hiv, psy = self.t.caller, [LABELS[0]], [LABELS[1]]
        p = self.prov
        for i in range(16):  # deny all to another member (no effect for the caller)
            yield self.consent(
                n, p("deny", actor=self.other_org(), action="access" if i % 2 else None)
            )
        for _ in range(3):  # denials that do not apply to reads for treatment
            yield self.consent(n, p("deny", purpose="HRESCH"))
            yield self.consent(n, p("deny", action="collect"))
        for _ in range(8):  # deny Observations of a data period to everyone
            yield self.consent(n, p("deny", cls="Observation", period=self.window(90)))
        for _ in range(6):  # permit HIV to the caller, except in a data period
            sub = [p("deny", period=self.window(120))]
            yield self.consent(n, p("permit", actor=c, labels=hiv, purpose=PURPOSE, sub=sub))
        for _ in range(6):  # deny the caller Observations of a period, except HIV ones
            inner = [p("deny", purpose="HRESCH")]
            sub = [p("permit", labels=hiv, sub=inner)]
            root = p("deny", actor=c, cls="Observation", period=self.window(180), sub=sub)
            yield self.consent(n, root)
        for _ in range(8):  # another member: all but PSY (no effect for the caller)
            sub = [p("deny", cls="Observation", labels=psy)]
            yield self.consent(n, p(None, actor=self.other_org(), sub=sub), "OPTIN")

    def window(self, days: int) -> tuple[float, float]:
        start = EFFECTIVE_FROM.timestamp() + self.rng.randrange(EFFECTIVE_SPAN - days * 86_400)
        return start, start + days * 86_400

    def prov(
        self,
        type_: str | None,
        *,
        actor: int | None = None,
        action: str | None = None,
        purpose: str | None = None,
        cls: str | None = None,
        labels: list[tuple[str, str]] = (),
        period: tuple[float, float] | None = None,
        sub: list[dict] = (),
    ) -> dict:
        out: dict[str, Any] = {}
        if type_:
            out["type"] = type_
        if period:
            start, end = (
                dt.datetime.fromtimestamp(x, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") for x in period
            )
            out["dataPeriod"] = {"start": start, "end": end}
        if actor is not None:
            out["actor"] = [
                {
                    "role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]},
                    "reference": {"reference": f"Organization/{self.t.orgs[actor][0]}"},
                }
            ]
        if action:
            out["action"] = [{"coding": [{"system": CONSENT_ACTION, "code": action}]}]
        if labels:
            out["securityLabel"] = [{"system": s, "code": c} for s, c in labels]
        if purpose:
            out["purpose"] = [{"system": ACT_REASON, "code": purpose}]
        if cls:
            out["class"] = [{"system": RESOURCE_TYPES, "code": cls}]
        if sub:
            out["provision"] = list(sub)
        return out

    def consent(self, n: int, root: dict, policy: str | None = None) -> tuple[str, str, dict]:
        t = self.t
        cid = self.uuid()
        policy = policy or ("OPTIN" if root.get("type") == "permit" else "OPTOUT")
        body = {
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": LOINC_SYSTEM, "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{t.patient_ids[n]}"},
            "dateTime": "2024-06-01T10:00:00+08:00",
            "policyRule": {"coding": [{"system": ACT_CODE, "code": policy}]},
            "provision": root,
        }
        self.tag(body, t.org_of[n])
        t.consents.setdefault(n, []).append((cid, body))
        return "Consent", cid, body


VISIBLE, WITHHELD, UNSURE = 0, 1, 2


class ConsentPolicy:
    """The contract's decision (docs: /tmp/consent-spec.md, hie/access/consent.py) for
    the benchmark's caller, over the Consents the generator wrote: what a member of
    ``caller`` reading for treatment may see, under the default opt-out policy.

    A permit that matches a sensitively labelled resource without naming its label is
    read both as that Consent denying and as not applying; where the two readings
    differ the answer is UNSURE (the checks accept either). The generator avoids such
    cases, and ``unsure`` counts them."""

    def __init__(self, truth: Truth):
        self.t = truth
        self.caller_ref = f"Organization/{truth.orgs[truth.caller][0]}"

    def visibility(
        self, type_: str, labels: frozenset, when: float, writer: int, patient: int
    ) -> int:
        if writer == self.t.caller:
            return VISIBLE  # a member always sees what it wrote
        decisions = [
            self.decide(c, type_, labels, when) for _, c in self.t.consents.get(patient, ())
        ]
        default = WITHHELD if labels & SENSITIVE else VISIBLE
        strict = self.combine(["deny" if d == "unnamed" else d for d in decisions], default)
        lenient = self.combine([None if d == "unnamed" else d for d in decisions], default)
        return strict if strict == lenient else UNSURE

    @staticmethod
    def combine(decisions: list[str | None], default: int) -> int:
        if "deny" in decisions:
            return WITHHELD
        return VISIBLE if "permit" in decisions else default

    def decide(self, consent: dict, type_: str, labels: frozenset, when: float) -> str | None:
        """permit, deny, None (not applicable) or "unnamed" (a permit that does not
        name every sensitive label the resource carries)."""
        rule = {c.get("code") for c in consent.get("policyRule", {}).get("coding", ())}
        base = "permit" if rule & {"OPTIN", "OPTINR"} else "deny" if rule else None
        found = self.provision(consent.get("provision", {}), type_, labels, when, base, frozenset())
        if found is None:
            return None
        decision, named = found
        if decision == "permit" and (labels & SENSITIVE) - named:
            return "unnamed"
        return decision

    def provision(self, p, type_, labels, when, base, named) -> tuple[str, frozenset] | None:
        if not self.matches(p, type_, labels, when):
            return None
        named = named | {(c.get("system"), c.get("code")) for c in p.get("securityLabel", ())}
        kids = [self.provision(k, type_, labels, when, None, named) for k in p.get("provision", ())]
        kids = [k for k in kids if k is not None]
        if kids:  # the deepest match decides; among siblings, deny wins
            return next((k for k in kids if k[0] == "deny"), kids[0])
        return p.get("type") or base, named

    def matches(self, p: dict, type_: str, labels: frozenset, when: float) -> bool:
        if "actor" in p and not any(
            a.get("reference", {}).get("reference") == self.caller_ref for a in p["actor"]
        ):
            return False
        if "action" in p and not any(
            c.get("code") in READ_ACTIONS for a in p["action"] for c in a.get("coding", ())
        ):
            return False
        if "purpose" in p and not any(c.get("code") == PURPOSE for c in p["purpose"]):
            return False
        if "class" in p and not any(c.get("code") == type_ for c in p["class"]):
            return False
        if "securityLabel" in p and not (
            labels & {(c.get("system"), c.get("code")) for c in p["securityLabel"]}
        ):
            return False
        if "dataPeriod" in p:
            period = p["dataPeriod"]
            if (
                not _instant(period["start"]).timestamp()
                <= when
                <= _instant(period["end"]).timestamp()
            ):
                return False
        return True


# --------------------------------------------------------------------------- loading
def registry_fingerprint() -> str:
    """What the server compares at startup to decide whether to reindex."""
    from hie.fhir.search import extract
    from hie.fhir.search.registry import Registry

    version = getattr(extract, "index_version", None)
    return version(Registry()) if version else Registry().fingerprint()


def schema_digest() -> str:
    from hie.store import sqlite

    text = f"{sqlite.SCHEMA_VERSION}\n" + "\n".join(sqlite.SCHEMA)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_key(seed: int, size: int, consent: bool = False) -> dict[str, Any]:
    key = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "registry": registry_fingerprint(),
        "schema": schema_digest(),
    }
    if consent:
        key["consent"] = CONSENT_VERSION
    return key


async def load(data_dir: Path, gen: Generator, batch_size: int) -> dict[str, Any]:
    """Fill ``data_dir`` through FhirService.new_write + SqliteStore.commit; returns
    load statistics. Building the next batch overlaps the commit of the last one."""
    from hie.config import Settings
    from hie.fhir.search.registry import Registry
    from hie.fhir.service import FhirService
    from hie.store.sqlite import SqliteStore

    data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(data_dir, synchronous="OFF")
    await store.open()
    # A big page cache for the loading connection only (a private attribute: this is
    # a benchmark loader, not a server setting). The server opens its own connections.
    await store._run_write(lambda: store._write_conn.execute("PRAGMA cache_size=-1048576"))
    registry = Registry()
    service = FhirService(store, Settings(data_dir=data_dir), registry)
    t0 = time.perf_counter()
    build_s = 0.0
    done = 0
    pending: asyncio.Task | None = None
    batch: list = []
    next_log = time.perf_counter() + 30
    try:
        for type_, id_, body in gen.resources():
            b0 = time.perf_counter()
            batch.append(service.new_write(type_, id_, body, None, "POST"))
            build_s += time.perf_counter() - b0
            if len(batch) >= batch_size:
                if pending is not None:
                    await pending
                done += len(batch)
                pending = asyncio.ensure_future(store.commit(batch))
                batch = []
                if time.perf_counter() > next_log:
                    rate = done / (time.perf_counter() - t0)
                    log(f"  loaded {done:,} / {gen.size:,} ({rate:,.0f} res/s)")
                    next_log = time.perf_counter() + 30
        if pending is not None:
            await pending
        await store.commit(batch)
        done += len(batch)
        await mark_index_current(service)
        seconds = time.perf_counter() - t0
        await store._run_write(lambda: store._write_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    finally:
        await store.close()
    return {
        "resources": done,
        "seconds": round(seconds, 1),
        "res_per_s": round(done / seconds),
        "build_seconds": round(build_s, 1),
        "batch": batch_size,
    }


def prewarm(data_dir: Path) -> None:
    """Read the database files once, so that the OS page cache holds them and the
    measurement sees memory, not the disk (a long-running server's hot data)."""
    t0, total = time.perf_counter(), 0
    for path in sorted(data_dir.glob("hie.sqlite3*")):
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(16 * 2**20):
                total += len(chunk)
    log(f"  read {total / 2**20:,.0f} MiB into the page cache in {time.perf_counter() - t0:.1f} s")


def db_mib(data_dir: Path) -> float:
    return round(sum(f.stat().st_size for f in data_dir.glob("hie.sqlite3*")) / 2**20, 1)


def prepare(args: argparse.Namespace, size: int) -> tuple[Path, Truth, dict]:
    """The data directory of ``size`` (loaded now, or reused) and its truth."""
    consent = getattr(args, "consent", False)
    root = args.cache_dir / (f"{size}-seed{args.seed}" + ("-consent" if consent else ""))
    data_dir = root / "data"
    manifest_path = root / "manifest.json"
    key = manifest_key(args.seed, size, consent)
    gen = Generator(args.seed, size, consent)
    if args.reuse and manifest_path.exists():
        manifest = orjson.loads(manifest_path.read_bytes())
        if manifest.get("key") == key and (data_dir / "hie.sqlite3").exists():
            log(f"size {size:,}: reusing {data_dir} (loaded {manifest['loaded_at']})")
            for _ in gen.resources():  # regenerate the truth only
                pass
            return data_dir, gen.truth, manifest
        log(f"size {size:,}: cached data is stale ({manifest.get('key')} != {key}); reloading")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log(f"size {size:,}: loading into {data_dir} (batches of {args.batch:,}, synchronous=OFF)")
    stats = run_async(load(data_dir, gen, args.batch))
    stats["db_mib"] = db_mib(data_dir)
    log(
        f"size {size:,}: loaded {stats['resources']:,} in {stats['seconds']:.0f} s "
        f"({stats['res_per_s']:,} res/s; {stats['db_mib']:,.0f} MiB)"
    )
    manifest = {
        "key": key,
        "loaded_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": stats,
        "counts": gen.truth.counts(),
    }
    manifest_path.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return data_dir, gen.truth, manifest


# --------------------------------------------------------------------------- queries
Params = list[tuple[str, str]]


@dataclass
class Case:
    """One request of a query shape: its URL parameters and what the answer must be."""

    params: Params
    expect: dict[str, Any]
    #: Follow the ``next`` link: ``params`` is the first page's search on this type,
    #: run untimed; the timed request is its next link, fetched for the first time.
    follow: str | None = None
    #: The path to GET (``--consent``: a read, an operation), else the shape's type.
    path: str | None = None


@dataclass
class Shape:
    """A query shape of the mix."""

    name: str
    type: str
    example: str
    single: bool  # an indexed single-parameter search (the 50 ms target applies)
    make: Callable[[random.Random], Case]
    check: Callable[[dict, dict], str | None]


def _entries(bundle: dict, mode: str = "match") -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def _ids(bundle: dict, mode: str = "match") -> list[str]:
    return [r["id"] for r in _entries(bundle, mode)]


def _total(bundle: dict, expected: int) -> str | None:
    if "total" in bundle and bundle["total"] != expected:
        return f"total {bundle['total']} != expected {expected}"
    return None


def _page(bundle: dict, expected: int, count: int) -> str | None:
    got = len(_ids(bundle))
    if got != min(expected, count):
        return f"{got} matches on the page, expected {min(expected, count)}"
    return _total(bundle, expected)


class Mix:
    """The fixed mix of query shapes over one generated data set."""

    def __init__(self, truth: Truth):
        self.t = t = truth
        self.code_counts = Counter(t.obs_code)
        self.patient_index = {pid: n for n, pid in enumerate(t.patient_ids)}
        self.prefix_counts: Counter = Counter()
        for tokens in t.tokens:
            self.prefix_counts.update({tok[:2] for tok in tokens if len(tok) >= 2})
        self.family_counts = Counter(f[0] for f in t.cjk_family if f)
        self.org_obs = Counter()
        for p in t.obs_patient:
            self.org_obs[t.org_of[p]] += 1
        rare = CODES.index(next(c for c in CODES if c[0] == RARE_CODE))
        self.rare_index = rare
        self.rare_patients = {t.obs_patient[i] for i, k in enumerate(t.obs_code) if k == rare}
        self.born_1990 = sum(1 for b in t.birth if b >= "1990-01-01")
        self.mol_over = sum(1 for v in t.obs_mol if v > 5.5)
        self.broad_codes = [k for k, c in enumerate(CODES) if c[0] != RARE_CODE]
        self.obs_code_by_id: dict[str, int] | None = None

    def code_of(self, oid: str) -> int:
        if self.obs_code_by_id is None:
            self.obs_code_by_id = dict(zip(self.t.obs_ids, self.t.obs_code, strict=True))
        return self.obs_code_by_id.get(oid, -1)

    def shapes(self) -> list[Shape]:
        t = self.t

        def patient(rng: random.Random) -> int:
            return rng.randrange(len(t.patient_ids))

        def obs_of(n: int) -> set[str]:
            return {t.obs_ids[i] for i in t.by_patient[n]}

        # -- identifier
        def ident(rng):
            n = patient(rng)
            return Case([("identifier", f"{MRN_SYSTEM}|{t.mrn[n]}")], {"ids": [t.patient_ids[n]]})

        def check_exact(b, e):
            got = _ids(b)
            return None if got == e["ids"] else f"got {got[:3]}, expected {e['ids']}"

        # -- token, broad
        def code(rng, extra=()):
            k = rng.choice(self.broad_codes)
            params = [("code", f"{LOINC_SYSTEM}|{CODES[k][0]}"), *extra, ("_count", "20")]
            return Case(params, {"code": k, "n": self.code_counts[k], "count": 20})

        def check_code(b, e):
            bad = [i for i in _ids(b) if self.code_of(i) != e["code"]]
            if bad:
                return f"{len(bad)} matches with another code"
            return _page(b, e["n"], e["count"])

        def check_code_total(b, e):
            if b.get("total") is None:
                return "no total with _total=accurate"
            return check_code(b, e)

        # -- reference + date sort, chain: the Observations of one Patient
        def subject_sorted(rng):
            n = patient(rng)
            params = [("subject", f"Patient/{t.patient_ids[n]}"), ("_sort", "-date")]
            return Case(params, {"patient": n, "ids": obs_of(n), "sorted": True})

        def check_obs_of(b, e):
            got = _ids(b)
            if set(got) != e["ids"] or len(got) != len(e["ids"]):
                return f"{len(got)} Observations, expected {len(e['ids'])} of that Patient"
            if e.get("sorted"):
                when = [_instant(r["effectiveDateTime"]) for r in _entries(b)]
                if when != sorted(when, reverse=True):
                    return "not sorted by -date"
            if e.get("include"):
                inc = _ids(b, "include")
                if inc != [t.patient_ids[e["patient"]]]:
                    return f"included {inc}, expected the subject"
            return None

        def chain(rng):
            n = patient(rng)
            params = [("subject:Patient.identifier", f"{MRN_SYSTEM}|{t.mrn[n]}")]
            return Case(params, {"patient": n, "ids": obs_of(n)})

        def include(rng):
            n = patient(rng)
            params = [
                ("subject", f"Patient/{t.patient_ids[n]}"),
                ("_include", "Observation:subject"),
            ]
            return Case(params, {"patient": n, "ids": obs_of(n), "include": True})

        # -- strings
        prefixes = sorted(p for p, c in self.prefix_counts.items() if c and p.isascii())
        cjk_prefixes = sorted(p for p, c in self.prefix_counts.items() if not p.isascii())

        def name(rng):
            p = rng.choice(prefixes if rng.random() < 0.6 else cjk_prefixes or prefixes)
            return Case([("name", p)], {"prefix": p, "n": self.prefix_counts[p], "count": 50})

        def check_name(b, e):
            for r in _entries(b):
                parts = [fold(x) for nm in r.get("name", []) for x in _name_parts(nm)]
                if not any(x.startswith(e["prefix"]) for x in parts):
                    return f"Patient/{r['id']} has no name starting with {e['prefix']!r}"
            return _page(b, e["n"], e["count"])

        families = sorted(self.family_counts)

        def family(rng):
            f = rng.choice(families)
            return Case([("family", f)], {"family": f, "n": self.family_counts[f], "count": 50})

        def check_family(b, e):
            for r in _entries(b):
                if not any(nm.get("family", "").startswith(e["family"]) for nm in r["name"]):
                    return f"Patient/{r['id']} has another family name"
            return _page(b, e["n"], e["count"])

        # -- two-level chain
        def chain2(rng):
            k = rng.randrange(len(t.orgs))
            params = [("subject:Patient.organization.name", t.orgs[k][1]), ("_count", "20")]
            return Case(params, {"n": self.org_obs[k], "count": 20})

        def check_total(b, e):
            return _page(b, e["n"], e["count"])

        # -- _has
        def has(rng):
            params = [("_has:Observation:subject:code", RARE_CODE), ("_count", "20")]
            return Case(params, {"n": len(self.rare_patients), "count": 20})

        def check_has(b, e):
            bad = [i for i in _ids(b) if self.patient_index.get(i) not in self.rare_patients]
            return f"{len(bad)} Patients without the code" if bad else check_total(b, e)

        # -- date, quantity
        def birthdate(rng):
            params = [("birthdate", "ge1990-01-01"), ("_count", "20")]
            return Case(params, {"n": self.born_1990, "count": 20})

        def check_birth(b, e):
            if any(r["birthDate"] < "1990-01-01" for r in _entries(b)):
                return "a Patient born before 1990"
            return check_total(b, e)

        def quantity(rng):
            params = [("value-quantity", f"gt5.5|{UCUM}|mmol/L"), ("_count", "20")]
            return Case(params, {"n": self.mol_over, "count": 20})

        def check_quantity(b, e):
            for r in _entries(b):
                q = r.get("valueQuantity", {})
                if q.get("code") not in MOLAR or q["value"] * MOLAR[q["code"]] <= 5.5:
                    return f"Observation/{r['id']} has {q.get('value')} {q.get('code')}"
            return check_total(b, e)

        # -- the second page of a broad search
        def next_page(rng):
            k = rng.choice(self.broad_codes)
            params = [("code", f"{LOINC_SYSTEM}|{CODES[k][0]}"), ("_count", "20")]
            expect = {"code": k, "n": self.code_counts[k], "first": set()}
            return Case(params, expect, follow="Observation")

        def check_next(b, e):
            got = _ids(b)
            if len(got) != min(20, e["n"] - 20):
                return f"{len(got)} matches on page 2"
            if set(got) & e["first"]:
                return "page 2 repeats page 1"
            if any(self.code_of(i) != e["code"] for i in got):
                return "a match with another code"
            total = b.get("total")
            if total is not None and total != e["n"]:
                return f"note: page 2 says total {total}, the true count is {e['n']}"
            return None

        loinc = f"code={LOINC_SYSTEM}|<code>"
        return [
            Shape("identifier", "Patient", f"identifier={MRN_SYSTEM}|<mrn>", True, ident,
                  check_exact),
            Shape("token (broad)", "Observation", f"{loinc}&_count=20", True, code, check_code),
            Shape("reference + sort", "Observation", "subject=Patient/<id>&_sort=-date", True,
                  subject_sorted, check_obs_of),
            Shape("string prefix", "Patient", "name=<2 chars>", True, name, check_name),
            Shape("CJK family", "Patient", "family=<张>", True, family, check_family),
            Shape("birthdate", "Patient", "birthdate=ge1990-01-01&_count=20", True, birthdate,
                  check_birth),
            Shape("quantity", "Observation", f"value-quantity=gt5.5|{UCUM}|mmol/L&_count=20",
                  True, quantity, check_quantity),
            Shape("chain", "Observation", f"subject:Patient.identifier={MRN_SYSTEM}|<mrn>",
                  False, chain, check_obs_of),
            Shape("chain, 2 levels", "Observation",
                  "subject:Patient.organization.name=<org>&_count=20", False, chain2,
                  check_total),
            Shape("_include", "Observation",
                  "subject=Patient/<id>&_include=Observation:subject", False, include,
                  check_obs_of),
            Shape("_has", "Patient", f"_has:Observation:subject:code={RARE_CODE}&_count=20",
                  False, has, check_has),
            Shape("_total=accurate", "Observation", f"{loinc}&_total=accurate&_count=20",
                  False, lambda rng: code(rng, [("_total", "accurate")]), check_code_total),
            Shape("next page", "", "_getpages=<key>&_getpagesoffset=20&_count=20", False,
                  next_page, check_next),
        ]  # fmt: skip


class ConsentMix(Mix):
    """The query shapes of ``--consent``. Each case carries one expectation per mode
    (``off``: every resource; ``on``: what :class:`ConsentPolicy` leaves visible)."""

    def __init__(self, truth: Truth):
        super().__init__(truth)
        t = self.t
        policy = ConsentPolicy(t)
        now = time.time()
        self.obs_seen = bytearray(len(t.obs_ids))
        for i in range(len(t.obs_ids)):
            label = t.obs_label[i]
            labels = frozenset([LABELS[label]]) if label >= 0 else frozenset()
            writer, n = t.obs_writer[i], t.obs_patient[i]
            if n in t.consents:
                seen = policy.visibility("Observation", labels, t.obs_when[i], writer, n)
            elif writer != t.caller and labels:
                seen = WITHHELD
            else:
                seen = VISIBLE
            self.obs_seen[i] = seen
        self.unsure = self.obs_seen.count(UNSURE)
        self.consented = set(t.consents)
        # the baseline reads: Patients no Consent speaks of (visible in both modes)
        self.read_ids = [pid for n, pid in enumerate(t.patient_ids) if n not in self.consented]
        # -- by code: every Observation, and per visibility
        self.code_all: dict[int, set[str]] = {}
        self.code_seen: dict[int, list[set[str]]] = {}
        for i, (oid, k) in enumerate(zip(t.obs_ids, t.obs_code, strict=True)):
            self.code_all.setdefault(k, set()).add(oid)
            self.code_seen.setdefault(k, [set(), set(), set()])[self.obs_seen[i]].add(oid)
        # -- the heavy patient: its Observations, and its whole record ($everything)
        h = t.heavy
        pid = t.patient_ids[h]
        self.heavy_obs = [set(), set(), set()]
        for i in t.by_patient[h]:
            self.heavy_obs[self.obs_seen[i]].add(t.obs_ids[i])
        everything = [set(), set(), set()]
        everything[policy.visibility("Patient", frozenset(), now, t.org_of[h], h)].add(
            f"Patient/{pid}"
        )
        for cid, _ in t.consents.get(h, ()):
            seen = policy.visibility("Consent", frozenset(), now, t.org_of[h], h)
            everything[seen].add(f"Consent/{cid}")
        for i in t.by_patient[h]:
            everything[self.obs_seen[i]].add(f"Observation/{t.obs_ids[i]}")
        self.heavy_everything = everything
        # -- the reads: half among the Observations of patients with Consents
        self.consented_obs = [i for n in sorted(self.consented) for i in t.by_patient[n]]

    def summary(self) -> dict[str, Any]:
        t, seen = self.t, self.obs_seen
        return {
            "caller": f"Organization/{t.orgs[t.caller][0]}",
            "sensitive_observations": sum(1 for x in t.obs_label if x >= 0),
            "patients_with_consents": len(self.consented) - 1,
            "heavy_patient": t.patient_ids[t.heavy],
            "heavy_observations": len(t.by_patient[t.heavy]),
            "heavy_consents": len(t.consents.get(t.heavy, ())),
            "heavy_visible": len(self.heavy_obs[VISIBLE]),
            "observations_withheld": seen.count(WITHHELD),
            "observations_unsure": seen.count(UNSURE),
        }

    @staticmethod
    def expect(groups: list[set[str]], count: int, total: bool = False, **extra) -> dict:
        """What a page of ``count`` must be: ids from the visible (or unsure) group,
        as many as there are; ``total``: ``Bundle.total`` is required."""
        visible, withheld, unsure = groups
        return {
            "ids": visible,
            "withheld": withheld,
            "unsure": unsure,
            "n": len(visible),
            "count": count,
            "total": total,
            **extra,
        }

    def both(self, groups: list[set[str]], count: int, **extra) -> dict[str, dict]:
        everything = [groups[0] | groups[1] | groups[2], set(), set()]
        return {
            "off": self.expect(everything, count, **extra),
            "on": self.expect(groups, count, **extra),
        }

    def shapes(self) -> list[Shape]:
        t = self.t
        heavy = t.patient_ids[t.heavy]
        loinc = f"code={LOINC_SYSTEM}|<code>"

        def check_page(b: dict, e: dict) -> str | None:
            got = (
                [f"{r['resourceType']}/{r['id']}" for r in _entries(b)]
                if e.get("typed")
                else _ids(b)
            )
            if len(set(got)) != len(got):
                return "the page repeats a resource"
            leaked = [i for i in got if i in e["withheld"]]
            if leaked:
                return f"{len(leaked)} withheld resources returned, e.g. {leaked[0]}"
            stray = [i for i in got if i not in e["ids"] and i not in e["unsure"]]
            if stray:
                return f"{len(stray)} resources that do not match, e.g. {stray[0]}"
            lo, hi = e["n"], e["n"] + len(e["unsure"])
            if "first" in e:  # a next page
                if set(got) & e["first"]:
                    return "page 2 repeats page 1"
                lo, hi = max(0, lo - e["count"]), max(0, hi - e["count"])
            if not min(lo, e["count"]) <= len(got) <= min(hi, e["count"]):
                return f"{len(got)} on the page, expected {min(lo, e['count'])}"
            total = b.get("total")
            if total is None:
                return "no total with _total=accurate" if e["total"] else None
            if not e["n"] <= total <= e["n"] + len(e["unsure"]):
                wrong = f"total {total}, expected {e['n']}"
                return f"note: {wrong}" if "first" in e else wrong
            return None

        def check_read(b: dict, e: dict) -> str | None:
            return None if b.get("id") == e["id"] else f"read returned {b.get('id')}"

        def heavy_subject(rng, total=False):
            params = [("subject", f"Patient/{heavy}"), ("_count", "50")]
            if total:
                params.append(("_total", "accurate"))
            return Case(params, self.both(self.heavy_obs, 50, total=total), path="Observation")

        def code(rng, total=False):
            k = rng.choice(self.broad_codes)
            params = [("code", f"{LOINC_SYSTEM}|{CODES[k][0]}"), ("_count", "50")]
            if total:
                params.append(("_total", "accurate"))
            return Case(params, self.both(self.code_seen[k], 50, total=total), path="Observation")

        def next_page(rng):
            k = rng.choice(self.broad_codes)
            params = [("code", f"{LOINC_SYSTEM}|{CODES[k][0]}"), ("_count", "50")]
            expect = self.both(self.code_seen[k], 50, first=set())
            return Case(params, expect, follow="Observation")

        def everything(rng):
            expect = self.both(self.heavy_everything, 50, typed=True)
            return Case([("_count", "50")], expect, path=f"Patient/{heavy}/$everything")

        def read(rng):
            pool = self.consented_obs if rng.random() < 0.5 else None
            i = rng.choice(pool) if pool else rng.randrange(len(t.obs_ids))
            oid, seen = t.obs_ids[i], self.obs_seen[i]
            status = {VISIBLE: 200, WITHHELD: 403, UNSURE: None}[seen]
            expect = {"off": {"status": 200, "id": oid}, "on": {"status": status, "id": oid}}
            return Case([], expect, path=f"Observation/{oid}")

        subject = "Observation?subject=Patient/<heavy>&_count=50"
        code_ = f"Observation?{loinc}&_count=50"
        return [
            Shape("heavy: subject", "Observation", subject, False, heavy_subject, check_page),
            Shape("heavy: subject, _total", "Observation", f"{subject}&_total=accurate", False,
                  lambda rng: heavy_subject(rng, True), check_page),
            Shape("heavy: $everything", "Patient", "Patient/<heavy>/$everything?_count=50",
                  False, everything, check_page),
            Shape("many patients: code", "Observation", code_, False, code, check_page),
            Shape("many patients: _total", "Observation", f"{code_}&_total=accurate", False,
                  lambda rng: code(rng, True), check_page),
            Shape("many patients: page 2", "Observation",
                  "fhir?_getpages=<key>&_getpagesoffset=50&_count=50", False, next_page,
                  check_page),
            Shape("read", "Observation", "Observation/<id> (half of patients with Consents)",
                  False, read, check_read),
        ]  # fmt: skip


def _name_parts(name: dict) -> list[str]:
    parts = [name.get("family", ""), *name.get("given", []), name.get("text", "")]
    return [p for p in parts if p]


def _instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- measuring
@dataclass
class Stat:
    """Latencies of one query shape (or its baseline) at one size, in ms."""

    n: int
    p50: float
    p95: float
    mean: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stat:
        ms = sorted(s * 1e3 for s in seconds)
        mean = sum(ms) / len(ms) if ms else math.nan
        return cls(len(ms), percentile(ms, 0.5), percentile(ms, 0.95), mean)


@dataclass
class Row:
    size: int
    shape: str
    example: str
    single: bool
    http: Stat
    read: Stat
    cpu_ms: float | None  # server CPU per query (the read's excluded)
    read_cpu_ms: float | None
    other_cores: float | None
    matches: float  # mean number of matches (the true count)
    errors: int
    first_error: str | None
    notes: dict[str, int] = field(default_factory=dict)  # deviations that are not errors
    service: Stat | None = None
    store: Stat | None = None
    consent: str | None = None  # --consent: "off" or "on" (HIE_CONSENT of the server)
    phases: list[float] = field(default_factory=list)  # --consent: p50 ms of each phase


def proc_cpu(pid: int) -> float:
    """User+system CPU seconds of one process (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    rest = data[data.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


CLK_TCK = os.sysconf("SC_CLK_TCK")


class Runner:
    """One size: the server, the HTTP phases and the in-process phases."""

    def __init__(self, args: argparse.Namespace, size: int, data_dir: Path, truth: Truth):
        self.args, self.size, self.data_dir, self.truth = args, size, data_dir, truth
        self.mix = Mix(truth)
        self.server: Server | None = None
        self.rows: list[Row] = []
        self.cases: dict[str, list[Case]] = {}

    def env(self) -> dict[str, str]:
        return clean_env(HIE_DATA_DIR=str(self.data_dir), HIE_AUTH="on")

    def start(self) -> None:
        minted = subprocess.run(
            [*hie_executable(), "token", "--data-dir", str(self.data_dir), "--ttl", "86400"],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        self.token = minted.stdout.strip().splitlines()[-1]
        port = free_port()
        argv = [*hie_executable(), "serve", "--host", HOST, "--port", str(port)]
        argv += ["--data-dir", str(self.data_dir)]
        log_path = self.data_dir.parent / "hie.log"
        self.server = Server("hie serve", argv, self.env(), port, log_path)
        self.server.start(timeout=300)
        self.base = f"{self.server.url}/fhir"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def http(self) -> None:
        import httpx

        args, rng = self.args, random.Random(self.args.seed + self.size)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": FHIR_JSON}
        pid = self.server.proc.pid
        with httpx.Client(base_url=self.base, headers=headers, timeout=600) as client:

            def follow(case: Case) -> str:
                """Run a next-page case's first page (untimed); its next link."""
                first = client.get(f"/{case.follow}", params=case.params)
                first.raise_for_status()
                bundle = orjson.loads(first.content)
                case.expect["first"] = set(_ids(bundle))
                return next(x["url"] for x in bundle["link"] if x["relation"] == "next")

            def get(case: Case, type_: str, url: str | None) -> tuple[float, httpx.Response]:
                t0 = time.perf_counter()
                r = client.get(url) if url else client.get(f"/{type_}", params=case.params)
                return time.perf_counter() - t0, r

            for shape in self.mix.shapes():
                cases = [shape.make(rng) for _ in range(args.warmup + args.runs)]
                self.cases[shape.name] = cases[args.warmup :]
                reads = [rng.choice(self.truth.patient_ids) for _ in cases]
                q_lat, r_lat, q_cpu, r_cpu = [], [], 0.0, 0.0
                errors, first, notes = 0, None, Counter()
                busy0, own0 = machine_busy_seconds(), time.process_time()
                t_start = time.perf_counter()
                for i, (case, rid) in enumerate(zip(cases, reads, strict=True)):
                    warm = i < args.warmup
                    url = follow(case) if case.follow else None
                    c0 = proc_cpu(pid)
                    seconds, r = get(case, shape.type, url)
                    c1 = proc_cpu(pid)
                    problem = None
                    if r.status_code != 200:
                        problem = f"HTTP {r.status_code}: {r.text[:200]}"
                    else:
                        problem = shape.check(orjson.loads(r.content), case.expect)
                    if problem and problem.startswith("note: "):
                        notes[problem[6:]] += 1
                    elif problem:
                        errors += 1
                        first = first or f"{case.params}: {problem}"
                    t0 = time.perf_counter()
                    rr = client.get(f"/Patient/{rid}")
                    read_s = time.perf_counter() - t0
                    c2 = proc_cpu(pid)
                    if rr.status_code != 200:
                        errors += 1
                        first = first or f"read: HTTP {rr.status_code}"
                    if warm:
                        continue
                    q_lat.append(seconds)
                    r_lat.append(read_s)
                    q_cpu += c1 - c0
                    r_cpu += c2 - c1
                    spent = time.perf_counter() - t_start
                    if i + 1 >= args.warmup + args.min_runs and spent > args.max_seconds:
                        self.cases[shape.name] = cases[args.warmup : i + 1]
                        break
                elapsed = time.perf_counter() - t_start
                busy1, own = machine_busy_seconds(), time.process_time() - own0
                n = len(q_lat)
                other = None
                if busy0 is not None and busy1 is not None:  # neither us nor the server
                    other = max(0.0, (busy1 - busy0 - own - q_cpu - r_cpu) / elapsed)
                matches = sum(c.expect.get("n", len(c.expect.get("ids", ()))) for c in cases)
                row = Row(
                    size=self.size,
                    shape=shape.name,
                    example=f"{shape.type or 'fhir'}?{shape.example}",
                    single=shape.single,
                    http=Stat.of(q_lat),
                    read=Stat.of(r_lat),
                    cpu_ms=q_cpu * 1e3 / n if n else None,
                    read_cpu_ms=r_cpu * 1e3 / n if n else None,
                    other_cores=other,
                    matches=matches / len(cases),
                    errors=errors,
                    first_error=first,
                    notes=dict(notes),
                )
                self.rows.append(row)
                log(
                    f"  {shape.name:18} n={n:3} p50 {row.http.p50:8.2f} p95 {row.http.p95:8.2f} ms"
                    f" | read p50 {row.read.p50:5.2f} | cpu {row.cpu_ms or 0:7.2f} ms"
                    + (f" | {errors} ERRORS: {first}" if errors else "")
                )

    async def in_process(self) -> None:
        """The same cases through FhirService (what the HTTP route calls) and the
        store, in this process with the server stopped."""
        from hie.access.principal import LOCAL_DEVELOPER
        from hie.config import Settings
        from hie.fhir.search.registry import Registry
        from hie.fhir.service import FhirService
        from hie.store.sqlite import SqliteStore

        store = SqliteStore(self.data_dir)
        await store.open()
        try:
            service = FhirService(store, Settings(data_dir=self.data_dir), Registry())
            self.who = LOCAL_DEVELOPER
            by_name = {r.shape: r for r in self.rows if r.size == self.size}
            for shape in self.mix.shapes():
                service_s, store_s = [], []
                cases = self.cases[shape.name]
                started = time.perf_counter()
                for n, case in enumerate(cases[: self.args.warmup] + cases):
                    a, b = await self.one_in_process(service, store, shape, case)
                    service_s.append(a)
                    store_s.append(b)
                    spent = time.perf_counter() - started
                    if n >= self.args.warmup + self.args.min_runs and spent > self.args.max_seconds:
                        break
                row = by_name[shape.name]
                row.service = Stat.of(service_s[self.args.warmup :])
                row.store = Stat.of(store_s[self.args.warmup :])
                log(
                    f"  {shape.name:18} service p50 {row.service.p50:8.2f}"
                    f" p95 {row.service.p95:8.2f} | store page p50 {row.store.p50:8.2f}"
                    f" p95 {row.store.p95:8.2f} ms"
                )
        finally:
            await store.close()

    async def one_in_process(self, service, store, shape: Shape, case: Case):
        """Seconds of (FhirService's page with includes, ``match_ids`` of the page's
        ids; for a next page, both up to the end of that page)."""
        perf = time.perf_counter
        if case.follow:
            req = service.parse(case.follow, case.params, strict=True, base=self.base)
            found = await service.search(self.who, case.follow, req, base=self.base)
            offset, count = found.offset + found.count, found.count
            t0 = perf()
            await service.search_page(self.who, found.snapshot, offset, count, [])
            t1 = perf()
            await store.match_ids(case.follow, req.query, sort=req.sort, limit=offset + count)
            return t1 - t0, perf() - t1
        req = service.parse(shape.type, case.params, strict=True, base=self.base)
        t0 = perf()
        found = await service.search(self.who, shape.type, req, base=self.base)
        if req.includes:
            await service.include(self.who, found.matches, req.includes)
        t1 = perf()
        await store.match_ids(shape.type, req.query, sort=req.sort, limit=req.count)
        return t1 - t0, perf() - t1


class ConsentBench:
    """``--consent``: one size, the same data and member client with ``HIE_CONSENT=off``
    and ``on``. The phases run off, on, on, off (each a server started on the data
    directory and half of a mode's runs), so that a drift of the machine's load over
    the run weighs on both modes alike."""

    PHASES = ("off", "on", "on", "off")
    CLIENT = "bench-consent"

    def __init__(self, args: argparse.Namespace, size: int, data_dir: Path, mix: ConsentMix):
        self.args, self.size, self.data_dir, self.mix = args, size, data_dir, mix
        self.server: Server | None = None
        #: per mode, seconds from the end of each phase's warm-up until the server idled
        self.settle: dict[str, list[float]] = {}

    def env(self, mode: str) -> dict[str, str]:
        return clean_env(HIE_DATA_DIR=str(self.data_dir), HIE_AUTH="on", HIE_CONSENT=mode)

    def hie(self, *argv: str) -> str:
        done = subprocess.run(
            [*hie_executable(), *argv, "--data-dir", str(self.data_dir)],
            env=self.env("on"),
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return done.stdout.strip()

    def register(self) -> None:
        """A member client of the caller's Organization (a throw-away public key: the
        token comes from ``hie token --client``), purpose TREAT."""
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        pem = self.data_dir.parent / "bench-consent-client.pem"
        pem.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        t = self.mix.t
        self.hie(
            "client", "add", self.CLIENT, "--org", f"Organization/{t.orgs[t.caller][0]}",
            "--role", "member", "--scope", "system/*.rs", "--public-key", str(pem),
        )  # fmt: skip
        out = self.hie("token", "--client", self.CLIENT, "--purpose", PURPOSE, "--ttl", "86400")
        self.token = out.splitlines()[-1]

    def start(self, mode: str) -> None:
        port = free_port()
        argv = [*hie_executable(), "serve", "--host", HOST, "--port", str(port)]
        argv += ["--data-dir", str(self.data_dir)]
        log_path = self.data_dir.parent / "hie.log"
        self.server = Server(
            f"hie serve (HIE_CONSENT={mode})", argv, self.env(mode), port, log_path
        )
        self.server.start(timeout=300)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def measure(self, rows: list[Row]) -> None:
        import httpx

        args, mix = self.args, self.mix
        rng = random.Random(args.seed + self.size)
        shapes = mix.shapes()
        plan: dict[str, tuple[list[Case], list[tuple[Case, str]]]] = {}
        for shape in shapes:
            cases = [shape.make(rng) for _ in range(args.warmup + args.runs)]
            reads = [rng.choice(mix.read_ids) for _ in cases]
            plan[shape.name] = (
                cases[: args.warmup],
                list(zip(cases, reads, strict=True))[args.warmup :],
            )
        acc = {(s.name, m): _Acc() for s in shapes for m in ("off", "on")}
        for p, mode in enumerate(self.PHASES):
            chunk, chunks = self.PHASES[:p].count(mode), self.PHASES.count(mode)
            log(f"size {self.size:,}: phase {p + 1}/{len(self.PHASES)}, HIE_CONSENT={mode}")
            self.start(mode)
            try:
                headers = {"Authorization": f"Bearer {self.token}", "Accept": FHIR_JSON}
                base = f"{self.server.url}/fhir"
                with httpx.Client(base_url=base, headers=headers, timeout=600) as client:
                    # Every shape once first, then until the server's background work
                    # (computing callers' withheld sets) is done: the steady state.
                    for shape in shapes:
                        for case in plan[shape.name][0]:
                            self.one(client, shape, case, mode, None, None)
                    settled = wait_idle(self.server.proc.pid)
                    self.settle.setdefault(mode, []).append(settled)
                    log(f"  warmed up; the server was idle {settled:.1f} s later")
                    for shape in shapes:
                        warm, measured = plan[shape.name]
                        a = acc[shape.name, mode]
                        busy0, own0 = machine_busy_seconds(), time.process_time()
                        t0 = time.perf_counter()
                        mine, done = measured[chunk::chunks], len(a.q_lat)
                        for i, (case, rid) in enumerate(mine):
                            self.one(client, shape, case, mode, rid, a)
                            spent = time.perf_counter() - t0
                            if (
                                i + 1 >= args.min_runs / chunks
                                and spent > args.max_seconds / chunks
                            ):
                                log(f"  {shape.name}: {i + 1} of {len(mine)} runs in {spent:.0f} s")
                                break
                        a.elapsed += time.perf_counter() - t0
                        a.phases.append(Stat.of(a.q_lat[done:]).p50)
                        log(f"  {shape.name:24} {mode:3} p50 {a.phases[-1]:8.2f} ms (this phase)")
                        busy1 = machine_busy_seconds()
                        if busy0 is not None and busy1 is not None:
                            a.busy += busy1 - busy0 - (time.process_time() - own0)
                        else:
                            a.elapsed = math.nan
            except BaseException:
                if self.server is not None and self.server.proc is not None:
                    log(f"server log tail:\n{self.server.tail()}")
                raise
            finally:
                self.stop()
        for shape in shapes:
            for mode in ("off", "on"):
                a = acc[shape.name, mode]
                n = len(a.q_lat)
                cases = [c for c, _ in plan[shape.name][1]]
                matches = [c.expect[mode].get("n", 1) for c in cases]
                other = None
                if a.elapsed and not math.isnan(a.elapsed):
                    other = max(0.0, (a.busy - a.q_cpu - a.r_cpu) / a.elapsed)
                row = Row(
                    size=self.size,
                    shape=shape.name,
                    example=shape.example,
                    single=False,
                    http=Stat.of(a.q_lat),
                    read=Stat.of(a.r_lat),
                    cpu_ms=a.q_cpu * 1e3 / n if n else None,
                    read_cpu_ms=a.r_cpu * 1e3 / n if n else None,
                    other_cores=other,
                    matches=sum(matches) / len(matches) if matches else 0,
                    errors=a.errors,
                    first_error=a.first,
                    notes=dict(a.notes),
                    consent=mode,
                    phases=a.phases,
                )  # fmt: skip
                rows.append(row)
                log(
                    f"  {shape.name:24} {mode:3} n={n:3} p50 {row.http.p50:8.2f} p95 "
                    f"{row.http.p95:8.2f} ms | read p50 {row.read.p50:5.2f} | cpu "
                    f"{row.cpu_ms or 0:7.2f} ms"
                    + (f" | {a.errors} ERRORS: {a.first}" if a.errors else "")
                )

    def one(self, client, shape: Shape, case: Case, mode: str, rid: str | None, a: _Acc | None):
        """One request of ``case`` (and the baseline read of ``rid``), checked; timed
        into ``a`` unless it is a warm-up."""
        e = case.expect[mode]
        url = None
        if case.follow:  # the first page, untimed
            first = client.get(f"/{case.follow}", params=case.params)
            first.raise_for_status()
            bundle = orjson.loads(first.content)
            e["first"] = set(_ids(bundle))
            url = next((x["url"] for x in bundle.get("link", ()) if x["relation"] == "next"), None)
        pid = self.server.proc.pid
        c0 = proc_cpu(pid)
        t0 = time.perf_counter()
        if case.follow and url is None:
            r = None
        else:
            r = client.get(url) if url else client.get(f"/{case.path}", params=case.params)
        seconds = time.perf_counter() - t0
        c1 = proc_cpu(pid)
        status = e.get("status", 200)
        if r is None:
            problem = "no next link" if e["n"] + len(e["unsure"]) > e["count"] else None
        elif status is not None and r.status_code != status:
            problem = f"HTTP {r.status_code}, expected {status}: {r.text[:200]}"
        elif r.status_code == 200:
            problem = shape.check(orjson.loads(r.content), e)
        elif r.status_code == 403:
            problem = _check_forbidden(orjson.loads(r.content))
        else:
            problem = f"HTTP {r.status_code}: {r.text[:200]}"
        if a is None:
            return
        if problem and problem.startswith("note: "):
            a.notes[problem[6:]] += 1
        elif problem:
            a.errors += 1
            a.first = a.first or f"{case.path or case.follow}?{case.params}: {problem}"
        t1 = time.perf_counter()
        rr = client.get(f"/Patient/{rid}")
        read_s = time.perf_counter() - t1
        c2 = proc_cpu(pid)
        if rr.status_code != 200:
            a.errors += 1
            a.first = a.first or f"baseline read Patient/{rid}: HTTP {rr.status_code}"
        a.q_lat.append(seconds)
        a.r_lat.append(read_s)
        a.q_cpu += c1 - c0
        a.r_cpu += c2 - c1


@dataclass
class _Acc:
    """What one (shape, mode) gathers over its phases."""

    q_lat: list[float] = field(default_factory=list)
    r_lat: list[float] = field(default_factory=list)
    q_cpu: float = 0.0
    r_cpu: float = 0.0
    busy: float = 0.0
    elapsed: float = 0.0
    errors: int = 0
    first: str | None = None
    notes: Counter = field(default_factory=Counter)
    phases: list[float] = field(default_factory=list)


def _check_forbidden(body: dict) -> str | None:
    """A read withheld under consent: 403 OperationOutcome ``forbidden`` that says so."""
    issues = body.get("issue", []) if body.get("resourceType") == "OperationOutcome" else []
    if not any(i.get("code") == "forbidden" for i in issues):
        return f"403 without a forbidden issue: {str(body)[:200]}"
    if not any("consent" in i.get("diagnostics", "").lower() for i in issues):
        return f"403 whose diagnostics do not mention consent: {str(body)[:200]}"
    return None


# --------------------------------------------------------------------------- report
def _lat(s: Stat | None) -> str:
    return "n/a" if s is None or not s.n else f"{fmt_ms(s.p50)} / {fmt_ms(s.p95)}"


def _x(a: float, b: float) -> str:
    return "n/a" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:,.1f}×"


def _busy(rows: list[Row], size: int) -> list[str]:
    """The line saying how busy the machine was while ``size`` was measured."""
    busy = [r.other_cores for r in rows if r.size == size and r.other_cores is not None]
    if not busy:
        return []
    return [
        "",
        f"Other processes used {sum(busy) / len(busy):.2f} CPU cores on average during "
        f"these phases (at most {max(busy):.2f}).",
    ]


def _head(title: str, argv: list[str], info: dict) -> list[str]:
    """A report's title, command and machine lines."""
    return [
        title,
        "",
        f"Command: `{' '.join(argv)}`",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['ram_gib']} GiB RAM, "
        f"Python {info['python']}, SQLite {info['sqlite']}, {info['event_loop']}; "
        f"hie {info['hie_revision']}; {info['date']}.",
    ]


def report(
    rows: list[Row], sizes: list[int], manifests: dict[int, dict], info: dict, argv: list[str]
) -> str:
    out = _head("# HIE search benchmark", argv, info)
    out += [
        "",
        "| size | resources (Org / Patient / Observation) | on disk | load |",
        "|---|---|---|---|",
    ]
    for size in sizes:
        m = manifests[size]
        c, load_ = m["counts"], m["load"]
        out.append(
            f"| {size:,} | {c['Organization']:,} / {c['Patient']:,} / {c['Observation']:,} "
            f"| {m.get('db_mib', load_.get('db_mib', 0)):,.0f} MiB "
            f"| {load_['seconds']:,.0f} s, {load_['res_per_s']:,} res/s ({m['loaded_at']}) |"
        )
    for size in sizes:
        out += [
            "",
            f"## {size:,} resources",
            "",
            "| query | matches | HIE p50 / p95 ms | read p50 / p95 ms | HIE / read p50 · p95 "
            "| service p50 / p95 ms | store page p50 / p95 ms | server CPU ms/query | n | check |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r.size == size):
            ratio = f"{_x(r.http.p50, r.read.p50)} · {_x(r.http.p95, r.read.p95)}"
            cpu = "n/a" if r.cpu_ms is None else f"{r.cpu_ms:.1f}"
            check = "ok" if not r.errors else f"**{r.errors} failed**"
            if r.notes:
                check += " (" + "; ".join(f"{k}: {v}×" for k, v in r.notes.items()) + ")"
            out.append(
                f"| {r.shape}: `{r.example}` | {r.matches:,.0f} | {_lat(r.http)} | {_lat(r.read)} "
                f"| {ratio} | {_lat(r.service)} | {_lat(r.store)} | {cpu} | {r.http.n} | {check} |"
            )
        out += _busy(rows, size)
    out += ["", "## Growth of p95 with the data size", ""]
    head = " | ".join(f"p95 {s:,}" for s in sizes)
    out += [
        f"| query | {head} | growth | HIE / read p95 at {sizes[-1]:,} "
        "| p95 target | growth target |",
        "|" + "---|" * (len(sizes) + 5),
    ]
    by = {(r.shape, r.size): r for r in rows}
    for name in dict.fromkeys(r.shape for r in rows):
        cells = [by.get((name, s)) for s in sizes]
        p95 = [fmt_ms(c.http.p95) if c else "n/a" for c in cells]
        first, last = cells[0], cells[-1]
        growth = _x(last.http.p95, first.http.p95) if first and last else "n/a"
        ratio = _x(last.http.p95, last.read.p95) if last else "n/a"
        verdict = slope = "(no target)"
        if last is not None and last.single:
            ok = last.http.p95 <= TARGET_MS
            verdict = f"≤ {TARGET_MS:.0f} ms: {'met' if ok else 'MISSED'}"
            if first is not None and first is not last:
                ok = last.http.p95 <= LOG_GROWTH * first.http.p95
                slope = f"≤ {LOG_GROWTH:g}×: {'met' if ok else 'MISSED'}"
        out.append(f"| {name} | {' | '.join(p95)} | {growth} | {ratio} | {verdict} | {slope} |")
    out += [
        "",
        "HIE = `GET` over HTTP (auth on, one request at a time, keep-alive); read = "
        "`GET /fhir/Patient/{id}` right after each query; service = `FhirService.search` "
        "(+ `include`) in-process: the search's store work without HTTP; store page = one "
        "`SqliteStore.match_ids` for the page's ids only. next page = the `next` link of a "
        "fresh token search (its first page untimed), each link followed once, as a client "
        "would. "
        "Server CPU excludes the baseline read. growth = p95 at the largest size / p95 at "
        f"the smallest; logarithmic growth from 10k to 1M would be log(1M)/log(10k) = 1.5×, "
        f"so up to {LOG_GROWTH:g}× counts as logarithmic here (noise included).",
    ]
    return "\n".join(out) + "\n"


CONSENT_TARGET = 1.3  # consent on: at most 30% more latency than consent off


def report_consent(
    rows: list[Row], sizes: list[int], manifests: dict[int, dict], info: dict, argv: list[str]
) -> str:
    """The ``--consent`` report: each shape with consent off and on, and their ratio."""
    out = _head("# HIE search benchmark: consent", argv, info)
    out += [
        "",
        "| size | Org / Patient / Observation / Consent | sensitive Observations "
        "| other patients with a Consent | heavy patient: Observations (visible) / Consents "
        "| Observations withheld from the caller | on disk | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        m = manifests[size]
        c, load_, k = m["counts"], m["load"], m.get("consent", {})
        out.append(
            f"| {size:,} | {c['Organization']:,} / {c['Patient']:,} / {c['Observation']:,} / "
            f"{c.get('Consent', 0):,} | {k.get('sensitive_observations', 0):,} "
            f"| {k.get('patients_with_consents', 0):,} | {k.get('heavy_observations', 0):,} "
            f"({k.get('heavy_visible', 0):,}) / {k.get('heavy_consents', 0):,} "
            f"| {k.get('observations_withheld', 0):,} "
            f"| {m.get('db_mib', load_.get('db_mib', 0)):,.0f} MiB "
            f"| {load_['seconds']:,.0f} s ({m['loaded_at']}) |"
        )
    for size in sizes:
        settle = manifests[size].get("settle")
        if settle:
            out += [
                "",
                f"{size:,}: after each phase's warm-up (every query shape once) the server "
                "was idle (its background work, such as computing the caller's withheld sets, "
                "done) after "
                + "; ".join(f"{m} {', '.join(f'{x} s' for x in v)}" for m, v in settle.items())
                + ". Measuring starts then.",
            ]
    by = {(r.size, r.shape, r.consent): r for r in rows}
    summary = []
    for size in sizes:
        out += [
            "",
            f"## {size:,} resources",
            "",
            "| query | matches off → on | off p50 / p95 ms | on p50 / p95 ms "
            f"| on / off p50 · p95 | ≤ {CONSENT_TARGET:g}× | server CPU ms off → on "
            "| read p50 off / on ms | n | check off / on |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in dict.fromkeys(r.shape for r in rows if r.size == size):
            off, on = by.get((size, name, "off")), by.get((size, name, "on"))
            if off is None or on is None:
                continue
            r50, r95 = on.http.p50 / off.http.p50, on.http.p95 / off.http.p95
            verdict = (
                "met"
                if max(r50, r95) <= CONSENT_TARGET
                else "p50 met, p95 MISSED"
                if r50 <= CONSENT_TARGET
                else "MISSED"
            )
            summary.append((name, size, r50, r95, verdict))
            cpu = "n/a"
            if off.cpu_ms is not None and on.cpu_ms is not None:
                cpu = f"{off.cpu_ms:.1f} → {on.cpu_ms:.1f}"
            checks = []
            for r in (off, on):
                check = "ok" if not r.errors else f"**{r.errors} failed**: {r.first_error}"
                if r.notes:
                    check += " (" + "; ".join(f"{k}: {v}×" for k, v in r.notes.items()) + ")"
                checks.append(check)
            out.append(
                f"| {name}: `{on.example}` | {off.matches:,.0f} → {on.matches:,.0f} "
                f"| {_lat(off.http)} | {_lat(on.http)} | {r50:.2f}× · {r95:.2f}× | {verdict} "
                f"| {cpu} | {fmt_ms(off.read.p50)} / {fmt_ms(on.read.p50)} | {on.http.n} "
                f"| {' / '.join(checks)} |"
            )
        out += _busy(rows, size)
    missed = [s for s in summary if s[4] != "met"]
    out += [
        "",
        f"Target (on / off ≤ {CONSENT_TARGET:g}× at p50 and p95): "
        + (
            "met by every shape at every size."
            if not missed
            else "missed by "
            + ", ".join(f"{n} at {s:,} ({a:.2f}× · {b:.2f}×)" for n, s, a, b, _ in missed)
            + "."
        ),
        "",
        "off / on = the server with `HIE_CONSENT=off` / `on` (default opt-out), the same data "
        "directory and the same member token (purpose TREAT; members are subject to "
        "consent, administrators are not); phases off, on, on, off, each with half of a "
        "mode's runs. matches = what the caller may see (the mean per request; for a "
        "read, 1). Every answer is checked against the generated Consents: no withheld "
        "resource returned, page sizes and totals equal to the visible counts, a withheld "
        "read 403. read = `GET /fhir/Patient/{id}` of a Patient without Consents, right "
        "after each query. Server CPU excludes the read.",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=ascending_sizes,
        default="10k,100k,1m",
        help="data sizes (resources), ascending",
    )
    p.add_argument("--runs", type=int, default=150, help="measured requests per query shape")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests per shape first")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=90.0,
        help="stop measuring a shape after this long, once it has --min-runs",
    )
    p.add_argument("--min-runs", type=int, default=20, help="runs per shape at least")
    p.add_argument("--seed", type=int, default=20240601, help="RNG seed of the data")
    p.add_argument("--batch", type=int, default=BATCH, help="writes per commit when loading")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("/tmp/hie-bench-search"),
        help="where the loaded data directories are kept (one per size and seed)",
    )
    p.add_argument(
        "--reuse", action="store_true", help="reuse a cached data directory when it matches"
    )
    p.add_argument("--load-only", action="store_true", help="load (or check) the data and stop")
    p.add_argument(
        "--no-prewarm",
        action="store_true",
        help="do not read the database into the OS page cache before measuring",
    )
    p.add_argument("--no-in-process", action="store_true", help="skip the service/store columns")
    p.add_argument(
        "--consent",
        action="store_true",
        help="the consent benchmark instead of the search mix: Consents and security labels "
        "in the data (a data directory of its own), a member client, HIE_CONSENT off vs on",
    )
    p.add_argument("--json", metavar="PATH", help="also write all figures as JSON to PATH")
    p.add_argument(
        "--from-json", metavar="PATH", help="only print the report of an earlier run's --json"
    )
    args = p.parse_args(argv)
    if min(args.sizes) < 1000:
        p.error("--sizes must be at least 1k")
    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--runs >= 1, --warmup >= 0 and --batch >= 1 required")
    return args


def report_from_json(path: str) -> str:
    """The Markdown report of a run saved with ``--json``."""
    data = orjson.loads(Path(path).read_bytes())
    rows = []
    for r in data["rows"]:
        for key in ("http", "read", "service", "store"):
            if r.get(key) is not None:
                r[key] = Stat(**r[key])
        rows.append(Row(**r))
    args = data["args"]
    sizes = [s for s in args["sizes"] if any(r.size == s for r in rows)]
    manifests = {int(s): m for s, m in data["data"].items()}
    argv = args.get("argv") or ["scripts/bench_search.py"]
    make = report_consent if args.get("consent") else report
    return make(rows, sizes, manifests, data["machine"], argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        sys.stdout.write(report_from_json(args.from_json))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine_info()
    rows: list[Row] = []
    manifests: dict[int, dict] = {}
    try:
        measure_all(args, rows, manifests)
    finally:  # what was measured is reported even when interrupted
        if rows:
            shown = ["scripts/bench_search.py", *(argv if argv is not None else sys.argv[1:])]
            sizes = [s for s in args.sizes if any(r.size == s for r in rows)]
            argv_shown = [".venv/bin/python", *shown]
            make = report_consent if args.consent else report
            sys.stdout.write(make(rows, sizes, manifests, info, argv_shown))
            if args.json:
                payload = {
                    "machine": info,
                    "args": {
                        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                        "argv": argv_shown,
                    },
                    "data": {str(s): m for s, m in manifests.items()},
                    "rows": [asdict(r) for r in rows],
                    "notes": "latencies in ms",
                }
                Path(args.json).write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
                log(f"wrote {args.json}")
    return 0


def measure_all(args: argparse.Namespace, rows: list[Row], manifests: dict[int, dict]) -> None:
    """Load or reuse each size, then measure it; ``rows`` fills as sizes complete."""
    for size in args.sizes:
        data_dir, truth, manifest = prepare(args, size)
        manifest["db_mib"] = db_mib(data_dir)
        manifests[size] = manifest
        if args.consent:
            mix = ConsentMix(truth)
            manifest["consent"] = mix.summary()
            log(f"size {size:,}: consent data {manifest['consent']}")
        if args.load_only:
            continue
        if not args.no_prewarm:
            prewarm(data_dir)
        if args.consent:
            bench = ConsentBench(args, size, data_dir, mix)
            bench.register()
            bench.measure(rows)
            manifest["settle"] = {m: [round(x, 1) for x in v] for m, v in bench.settle.items()}
            continue
        runner = Runner(args, size, data_dir, truth)
        runner.rows = rows  # each shape's row is kept as soon as it is measured
        try:
            runner.start()
            log(f"size {size:,}: measuring {args.runs} runs per query shape")
            runner.http()
        except BaseException:
            if runner.server is not None and runner.server.proc is not None:
                log(f"server log tail:\n{runner.server.tail()}")
            raise
        finally:
            runner.stop()
        if "reindex" in runner.server.tail(200):
            log("WARNING: the server reindexed at startup; figures are disturbed")
        if not args.no_in_process:
            log(f"size {size:,}: in-process service and store, server stopped")
            run_async(runner.in_process())


if __name__ == "__main__":
    sys.exit(main())
