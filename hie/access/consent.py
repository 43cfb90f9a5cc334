"""Consent policy: R4 ``Consent`` resources (scope ``patient-privacy``) as rules, and
what they decide for one accessor and one resource.

A Consent is a tree of provisions. The root provision's ``type`` (or, without one,
the ``policyRule``: OPTIN/OPTINR permit, OPTOUT/OPTOUTE deny) is the base rule; nested
provisions are exceptions that refine their parent. A provision *matches* an access
when all its conditions hold: in force (``period``), actor (the accessing
organisation, its end user or their role, a CareTeam they belong to), action (a read
is ``access``, ``use`` and ``disclose``), purpose of use, class (resource type),
security labels, data period (the resource's care date) and specific data. For a
resource the deepest matching provision decides; when sibling provisions match with
different types, deny wins. A permit releases a resource carrying sensitive labels
only if the permit (or a provision enclosing it) names every one of them.

Across a person's Consents a deny wins, then a permit; when none applies the alliance
default decides (opt-out: treatment purposes, no sensitive label; opt-in: nothing).

The same semantics exist twice, kept equal by tests: :func:`decide` evaluates one
resource (with the provision that decided, for the audit record), and
:func:`permit_formula` turns a person's Consents, reduced for one accessor and type,
into a :data:`Formula` that :func:`to_term` translates into a store query term, so
that searches filter in the store instead of per resource in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hie.access.purpose import PURPOSES
from hie.access.purpose import SYSTEM as PURPOSE_SYSTEM
from hie.fhir.errors import FhirError, Issue
from hie.fhir.search.dates import date_range
from hie.fhir.types import served_types
from hie.store.query import AnyOf, Cond, IdIn, Match, Not, Term

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
PRIVACY = "patient-privacy"
ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
ACTIONS = frozenset({"collect", "access", "use", "disclose", "correct"})
#: The consent actions a read of shared data performs.
READ_ACTIONS = frozenset({"access", "use", "disclose"})
CLASS_SYSTEM = "http://hl7.org/fhir/resource-types"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
#: policyRule codes (v3 ActCode consent policies) and the base rule each gives.
POLICY_RULES = {"OPTIN": "permit", "OPTINR": "permit", "OPTOUT": "deny", "OPTOUTE": "deny"}
#: Labels never shared under the default policy: the v3 information sensitivity
#: policies (mental and behavioural health, HIV and other infectious disease,
#: reproductive and sexual health, substance use, genetics...) and the restricted and
#: very restricted confidentiality levels.
SENSITIVE = frozenset(
    [
        (ACT_CODE, c)
        for c in [
            "BH",
            "COGN",
            "DVD",
            "EMOTDIS",
            "ETH",
            "ETHUD",
            "GDIS",
            "HIV",
            "MH",
            "MST",
            "OPIOIDUD",
            "PSY",
            "PSYTHPN",
            "SCA",
            "SDV",
            "SEX",
            "SPI",
            "STD",
            "SUD",
            "TBOO",
        ]
    ]
    + [(CONFIDENTIALITY, "R"), (CONFIDENTIALITY, "V")]
)
#: Labels a Consent may name: the sensitive ones and the other confidentiality levels.
KNOWN_LABELS = SENSITIVE | {(CONFIDENTIALITY, c) for c in ("U", "L", "M", "N")}
#: Purposes of use the opt-out default shares for (treatment and its kinds).
TREATMENT_PURPOSES = frozenset({"TREAT", "ETREAT", "BTG", "COC"})
#: A purpose a provision names also covers its specialisations (v3 ActReason).
PURPOSE_PARENTS = {"ETREAT": "TREAT", "BTG": "ETREAT"}
#: What ``provision.actor.reference`` may name here: the callers of this server are
#: member systems, so Organizations and Practitioners are matched by reference, and
#: PractitionerRoles, CareTeams and Groups by their members. R4 also allows Patient,
#: RelatedPerson and Device actors, which never call this server: a Consent naming
#: them is refused rather than stored as a rule nobody can break.
ACTOR_TYPES = frozenset({"Organization", "Practitioner", "PractitionerRole", "CareTeam", "Group"})
MEANINGS = frozenset({"instance", "related", "dependents", "authoredby"})
#: Deepest provision nesting accepted (the root is level 1).
MAX_DEPTH = 10
OPT_OUT, OPT_IN = "opt-out", "opt-in"


# ------------------------------------------------------------------ the policy model
@dataclass(frozen=True, slots=True)
class Provision:
    """One provision: its rule (``permit``/``deny``), conditions and exceptions.
    ``path`` names it in reasons (``1`` the root, ``1.2`` its second exception)."""

    path: str
    type: str
    period: tuple[str, str] | None = None
    actors: tuple[str, ...] = ()
    actions: frozenset[str] = frozenset()
    purposes: frozenset[str] = frozenset()
    classes: frozenset[str] = frozenset()
    labels: frozenset[tuple[str, str]] = frozenset()
    data_period: tuple[str, str] | None = None
    data: tuple[tuple[str, str], ...] = ()
    children: tuple[Provision, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    """An active patient-privacy Consent as rules."""

    consent: str
    patient: str
    root: Provision

    def provisions(self) -> Iterable[Provision]:
        """Every provision, root first."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children)

    def actor_refs(self) -> set[str]:
        """The actors the provisions name."""
        return {a for p in self.provisions() for a in p.actors}

    def related_refs(self) -> set[str]:
        """Resources named with meaning ``related`` (whose references count too)."""
        return {ref for p in self.provisions() for meaning, ref in p.data if meaning == "related"}


def parse_policy(resource: dict, consent: str) -> Policy | None:
    """The rules of a Consent (``consent`` is its ``Consent/<id>``); None when it is
    not an active patient-privacy Consent. Raises 422 naming every problem."""
    problems: list[Issue] = []
    policy = _policy(resource, consent, problems)
    if problems:
        raise FhirError(422, problems)
    return policy


def is_privacy(resource: dict) -> bool:
    """True if a Consent's scope is patient-privacy."""
    scope = resource.get("scope")
    codings = scope.get("coding") if isinstance(scope, dict) else None
    return any(
        isinstance(c, dict) and c.get("system") == SCOPE_SYSTEM and c.get("code") == PRIVACY
        for c in codings or ()
    )


def _policy(resource: dict, consent: str, problems: list[Issue]) -> Policy | None:
    if not is_privacy(resource):
        return None

    def bad(message: str, where: str) -> None:
        problems.append(Issue("business-rule", message, expression=(where,)))

    patient = resource.get("patient")
    ref = patient.get("reference") if isinstance(patient, dict) else None
    if not isinstance(ref, str) or not ref.startswith("Patient/") or "/" in ref[8:]:
        bad("A patient-privacy Consent must name its patient (Patient/<id>)", "Consent.patient")
    base = None
    for coding in _codings(resource.get("policyRule")):
        if coding.get("system") == ACT_CODE and coding.get("code") in POLICY_RULES:
            base = POLICY_RULES[coding["code"]]
    raw = resource.get("provision")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        bad("provision must be an object", "Consent.provision")
        return None
    root_type = raw.get("type", base)
    if root_type is None:
        bad(
            "The Consent says neither permit nor deny: give the root provision a type or a "
            "policyRule (OPTIN, OPTOUT)",
            "Consent.provision.type",
        )
        return None
    root = _provision(raw, "1", root_type, 1, "Consent.provision", bad)
    if problems or resource.get("status") != "active":
        return None
    return Policy(consent, ref, root)


def _provision(raw: dict, path: str, type_: object, depth: int, where: str, bad) -> Provision:
    if depth > MAX_DEPTH:
        bad(f"Provisions are nested deeper than {MAX_DEPTH} levels", where)
        return Provision(path, "deny")
    if type_ not in ("permit", "deny"):
        bad("provision.type must be permit or deny", f"{where}.type")
    if "code" in raw:
        bad(
            "provision.code is not supported: label the resources (meta.security) or name "
            "their class instead",
            f"{where}.code",
        )
    actors = []
    for n, actor in enumerate(_list(raw, "actor", where, bad)):
        reference = actor.get("reference") if isinstance(actor, dict) else None
        ref = reference.get("reference") if isinstance(reference, dict) else None
        kind = ref.split("/", 1)[0] if isinstance(ref, str) else None
        if kind not in ACTOR_TYPES or ref.count("/") != 1:
            bad(
                f"An actor must reference one of {', '.join(sorted(ACTOR_TYPES))} as Type/id",
                f"{where}.actor[{n}].reference",
            )
        else:
            actors.append(ref)
    actions = set()
    for n, concept in enumerate(_list(raw, "action", where, bad)):
        for coding in _codings(concept):
            if coding.get("system") != ACTION_SYSTEM or coding.get("code") not in ACTIONS:
                bad(f"Unknown consent action {_show(coding)}", f"{where}.action[{n}]")
            else:
                actions.add(coding["code"])
    purposes = set()
    for n, coding in enumerate(_list(raw, "purpose", where, bad)):
        if coding.get("system") != PURPOSE_SYSTEM or coding.get("code") not in PURPOSES:
            bad(f"Unknown purpose of use {_show(coding)}", f"{where}.purpose[{n}]")
        else:
            purposes.add(coding["code"])
    classes = set()
    for n, coding in enumerate(_list(raw, "class", where, bad)):
        if coding.get("system") != CLASS_SYSTEM or coding.get("code") not in served_types():
            bad(f"Unknown resource class {_show(coding)}", f"{where}.class[{n}]")
        else:
            classes.add(coding["code"])
    labels = set()
    for n, coding in enumerate(_list(raw, "securityLabel", where, bad)):
        label = (coding.get("system"), coding.get("code"))
        if label not in KNOWN_LABELS:
            bad(f"Unknown security label {_show(coding)}", f"{where}.securityLabel[{n}]")
        else:
            labels.add(label)
    data = []
    for n, item in enumerate(_list(raw, "data", where, bad)):
        meaning = item.get("meaning")
        reference = item.get("reference")
        ref = reference.get("reference") if isinstance(reference, dict) else None
        if meaning not in MEANINGS:
            bad(f"Unknown data meaning {meaning!r}", f"{where}.data[{n}].meaning")
        elif not isinstance(ref, str) or ref.count("/") != 1:
            bad("data.reference must be a Type/id reference", f"{where}.data[{n}].reference")
        elif meaning == "authoredby" and not ref.startswith("Organization/"):
            bad("authoredby names an Organization", f"{where}.data[{n}].reference")
        else:
            data.append((meaning, ref))
    children = []
    for n, child in enumerate(_list(raw, "provision", where, bad)):
        here = f"{where}.provision[{n}]"
        if "type" not in child:
            bad("A nested provision must say permit or deny", f"{here}.type")
            continue
        children.append(_provision(child, f"{path}.{n + 1}", child["type"], depth + 1, here, bad))
    return Provision(
        path,
        type_ if type_ in ("permit", "deny") else "deny",
        _period(raw.get("period"), f"{where}.period", bad),
        tuple(actors),
        frozenset(actions),
        frozenset(purposes),
        frozenset(classes),
        frozenset(labels),
        _period(raw.get("dataPeriod"), f"{where}.dataPeriod", bad),
        tuple(data),
        tuple(children),
    )


def _list(raw: dict, key: str, where: str, bad) -> list[dict]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        bad(f"{key} must be a list of objects", f"{where}.{key}")
        return []
    return value


def _codings(concept: object) -> list[dict]:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return [c for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []


def _show(coding: dict) -> str:
    return f"{coding.get('system')}|{coding.get('code')}"


def _period(raw: object, where: str, bad) -> tuple[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        bad("A period must be an object", where)
        return None
    try:
        low = date_range(raw["start"])[0] if "start" in raw else "0001-01-01T00:00:00.000000Z"
        high = date_range(raw["end"])[1] if "end" in raw else "9999-12-31T23:59:59.999999Z"
    except (ValueError, TypeError, AttributeError):
        bad("A period's start and end must be FHIR dateTimes", where)
        return None
    if high < low:
        bad("The period ends before it starts", where)
        return None
    return low, high


# ------------------------------------------------------------------ the accessor
@dataclass(frozen=True, slots=True)
class ActorFacts:
    """Who an actor reference stands for: organisations, end users (Practitioner or
    PractitionerRole references) and (role code, organisation or None) pairs."""

    orgs: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    roles: frozenset[tuple[str, str | None]] = frozenset()


@dataclass(frozen=True, slots=True)
class Accessor:
    """Who asks, for what, when: the inputs of a decision besides the resource."""

    organization: str | None
    purpose: str
    now: str
    user: str | None = None
    user_role: str | None = None
    default: str = OPT_OUT

    def is_actor(self, facts: ActorFacts | None, deny: bool) -> bool:
        """True if this accessor is the actor ``facts`` describe; an actor that no
        longer resolves is everyone for a deny and no one for a permit."""
        if facts is None:
            return deny
        if self.organization is not None and self.organization in facts.orgs:
            return True
        if self.user is not None and self.user in facts.users:
            return True
        return self.user_role is not None and any(
            code == self.user_role and org in (None, self.organization) for code, org in facts.roles
        )

    def purposes(self) -> set[str]:
        """The purpose asked for and the purposes it specialises."""
        out, code = set(), self.purpose
        while code is not None:
            out.add(code)
            code = PURPOSE_PARENTS.get(code)
        return out

    def default_permits(self) -> bool:
        """True if the default policy shares unlabelled data for this purpose."""
        return self.default == OPT_OUT and self.purpose in TREATMENT_PURPOSES


def _fixed(p: Provision, acc: Accessor, actors: Mapping[str, ActorFacts]) -> bool | None:
    """The conditions of ``p`` that do not depend on the resource's content: False if
    one fails, else True (resource type is checked by the callers)."""
    if p.period is not None and not p.period[0] <= acc.now <= p.period[1]:
        return False
    if p.actors and not any(acc.is_actor(actors.get(a), p.type == "deny") for a in p.actors):
        return False
    if p.actions and not p.actions & READ_ACTIONS:
        return False
    return not p.purposes or bool(p.purposes & acc.purposes())


# ------------------------------------------------------------------ one resource
@dataclass(frozen=True, slots=True)
class Facts:
    """What a decision reads of one resource: ``ref`` (Type/id), the member
    organisation that wrote it, its security labels, care dates (low instants; the
    last-updated instant when it has none), patients and (lazily) references."""

    type: str
    ref: str
    writer: str | None
    labels: frozenset[tuple[str, str]]
    dates: tuple[str, ...]
    patients: tuple[str, ...]
    references: Callable[[], frozenset[str]] = field(default=frozenset, compare=False)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision on one resource for one patient: ``permit``, ``deny`` or None (the
    Consent does not apply), the reason, and what decided: ``Consent/<id>``, the
    default policy's name, or None when the resource is not patient data."""

    result: str | None
    reason: str
    by: str | None = None


def decide(
    policy: Policy,
    acc: Accessor,
    facts: Facts,
    actors: Mapping[str, ActorFacts],
    related: Mapping[str, frozenset[str]],
) -> Verdict:
    """What one Consent decides for one resource (see the module docstring)."""
    root = policy.root
    if not _matches(root, acc, facts, actors, related):
        return Verdict(None, f"{policy.consent} does not apply", policy.consent)
    result, node = _result(root, frozenset(), acc, facts, actors, related)
    return Verdict(result, f"{result}: {policy.consent} provision {node.path}", policy.consent)


def _result(p, named, acc, facts, actors, related) -> tuple[str, Provision]:
    named = named | p.labels
    outcomes = [
        _result(c, named, acc, facts, actors, related)
        for c in p.children
        if _matches(c, acc, facts, actors, related)
    ]
    if not outcomes:
        if p.type == "permit" and not (facts.labels & SENSITIVE) - named:
            return "permit", p
        return "deny", p
    return next((o for o in outcomes if o[0] == "deny"), outcomes[0])


def _matches(p, acc, facts, actors, related) -> bool:
    if not _fixed(p, acc, actors) or (p.classes and facts.type not in p.classes):
        return False
    if p.labels and not p.labels & facts.labels:
        return False
    if p.data_period is not None:
        low, high = p.data_period
        if not any(low <= d <= high for d in facts.dates):
            return False
    return not p.data or any(_data_holds(m, r, facts, related) for m, r in p.data)


def _data_holds(meaning: str, ref: str, facts: Facts, related) -> bool:
    if meaning == "authoredby":
        return facts.writer == ref
    if facts.ref == ref:
        return True
    if meaning == "related":
        return facts.ref in related.get(ref, frozenset())
    if meaning == "dependents":
        return ref in facts.references()
    return False


def person_verdict(
    policies: Sequence[Policy],
    acc: Accessor,
    facts: Facts,
    actors: Mapping[str, ActorFacts],
    related: Mapping[str, frozenset[str]],
) -> Verdict:
    """What a person's Consents decide for one resource: a deny wins, then a permit,
    else the default policy."""
    verdicts = [decide(p, acc, facts, actors, related) for p in policies]
    for wanted in ("deny", "permit"):
        found = next((v for v in verdicts if v.result == wanted), None)
        if found is not None:
            return found
    return default_verdict(acc, facts)


def default_verdict(acc: Accessor, facts: Facts) -> Verdict:
    """What the alliance default decides for a resource no Consent covers."""
    name = default_name(acc)
    if not acc.default_permits():
        why = "opt-in" if acc.default == OPT_IN else f"purpose {acc.purpose} is not treatment"
        return Verdict("deny", f"deny: {name}, {why}", name)
    if facts.labels & SENSITIVE:
        return Verdict("deny", f"deny: {name}, sensitive label needs an explicit permit", name)
    return Verdict("permit", f"permit: {name}", name)


def default_name(acc: Accessor) -> str:
    """The name of the default policy in reasons and audit records."""
    return f"alliance default policy ({acc.default})"


# ------------------------------------------------------------------ formulas
@dataclass(frozen=True, slots=True)
class Const:
    value: bool


@dataclass(frozen=True, slots=True)
class Label:
    """The resource carries one of ``labels`` (``loose``: or a label of one of their
    systems with one of their codes, a superset the store finds with one lookup)."""

    labels: frozenset[tuple[str, str]]
    loose: bool = False


@dataclass(frozen=True, slots=True)
class Dated:
    """Some care date of the resource lies in [low, high]."""

    low: str
    high: str


@dataclass(frozen=True, slots=True)
class Ids:
    """The resource is one of ``refs`` (Type/id)."""

    refs: frozenset[str]


@dataclass(frozen=True, slots=True)
class Refers:
    """The resource references one of ``refs``."""

    refs: frozenset[str]


@dataclass(frozen=True, slots=True)
class Writer:
    """The member organisation ``org`` wrote the resource."""

    org: str


@dataclass(frozen=True, slots=True)
class Concerns:
    """Some patient of the resource is one of ``refs``."""

    refs: frozenset[str]


@dataclass(frozen=True, slots=True)
class Outside:
    """Some patient of the resource is not one of ``refs``."""

    refs: frozenset[str]


@dataclass(frozen=True, slots=True)
class And:
    items: frozenset


@dataclass(frozen=True, slots=True)
class Or:
    items: frozenset


@dataclass(frozen=True, slots=True)
class Neg:
    item: object


TRUE, FALSE = Const(True), Const(False)
Formula = Const | Label | Dated | Ids | Refers | Writer | Concerns | Outside | And | Or | Neg


def conj(*items: Formula) -> Formula:
    """AND with constants folded and nested ANDs flattened."""
    out: set = set()
    for item in items:
        if item == FALSE:
            return FALSE
        if item == TRUE:
            continue
        out.update(item.items if isinstance(item, And) else (item,))
    if not out:
        return TRUE
    return next(iter(out)) if len(out) == 1 else And(frozenset(out))


def disj(*items: Formula) -> Formula:
    """OR with constants folded and nested ORs flattened."""
    out: set = set()
    for item in items:
        if item == TRUE:
            return TRUE
        if item == FALSE:
            continue
        out.update(item.items if isinstance(item, Or) else (item,))
    if not out:
        return FALSE
    return next(iter(out)) if len(out) == 1 else Or(frozenset(out))


def neg(item: Formula) -> Formula:
    """NOT, folding constants and double negation."""
    if isinstance(item, Const):
        return Const(not item.value)
    return item.item if isinstance(item, Neg) else Neg(item)


def _condition(p, acc, type_, actors, related) -> Formula:
    """When ``p`` matches a resource of ``type_`` for ``acc``."""
    if not _fixed(p, acc, actors) or (p.classes and type_ not in p.classes):
        return FALSE
    parts: list[Formula] = []
    if p.labels:
        parts.append(Label(p.labels))
    if p.data_period is not None:
        parts.append(Dated(*p.data_period))
    if p.data:
        parts.append(disj(*(_data_formula(m, r, related) for m, r in p.data)))
    return conj(*parts)


def _data_formula(meaning: str, ref: str, related) -> Formula:
    if meaning == "authoredby":
        return Writer(ref)
    if meaning == "related":
        return Ids(frozenset({ref}) | related.get(ref, frozenset()))
    if meaning == "dependents":
        return disj(Ids(frozenset({ref})), Refers(frozenset({ref})))
    return Ids(frozenset({ref}))


def _permits(p, named, acc, type_, actors, related) -> Formula:
    """When ``p``, given that it matches, ends in a permit."""
    named = named | p.labels
    if p.type == "permit":
        unnamed = SENSITIVE - named
        leaf = neg(Label(frozenset(unnamed))) if unnamed else TRUE
    else:
        leaf = FALSE
    conds = [_condition(c, acc, type_, actors, related) for c in p.children]
    none_match = conj(*(neg(m) for m in conds))
    all_permit = conj(
        *(
            disj(neg(m), _permits(c, named, acc, type_, actors, related))
            for c, m in zip(p.children, conds, strict=True)
        )
    )
    return disj(conj(none_match, leaf), conj(disj(*conds), all_permit))


def default_formula(acc: Accessor) -> Formula:
    """When the default policy permits a resource."""
    return neg(Label(SENSITIVE)) if acc.default_permits() else FALSE


def permit_formula(
    policies: Sequence[Policy],
    acc: Accessor,
    type_: str,
    actors: Mapping[str, ActorFacts],
    related: Mapping[str, frozenset[str]],
) -> Formula:
    """When a person's Consents (or the default) permit a resource of ``type_``."""
    denies, applies = [], []
    for policy in policies:
        condition = _condition(policy.root, acc, type_, actors, related)
        permitted = _permits(policy.root, frozenset(), acc, type_, actors, related)
        denies.append(conj(condition, neg(permitted)))
        applies.append(condition)
    return conj(*(neg(d) for d in denies), disj(*applies, default_formula(acc)))


def describe(
    policy: Policy,
    acc: Accessor,
    type_: str,
    actors: Mapping[str, ActorFacts],
    related: Mapping[str, frozenset[str]],
) -> str:
    """What one Consent says about ``type_`` resources for ``acc``, in words."""
    condition = _condition(policy.root, acc, type_, actors, related)
    if condition == FALSE:
        return f"{policy.consent} does not apply"
    permitted = _permits(policy.root, frozenset(), acc, type_, actors, related)
    if permitted == FALSE:
        verb = "denies"
    elif permitted in (TRUE, neg(Label(SENSITIVE))):
        verb = "permits (sensitive labels only where named)"
    else:
        verb = "permits some and denies others (by label, date or specific data)"
    where = "" if condition == TRUE else " the resources it covers"
    return f"{policy.consent} {verb}{where}"


# ------------------------------------------------------------------ in the store
@dataclass(frozen=True, slots=True)
class TypeShape:
    """What a formula needs to know of a resource type to become a query term: the
    parameters linking it to its patients, its reference parameters and the care
    date parameter (None: meta.lastUpdated)."""

    type: str
    patient_params: tuple[str, ...]
    reference_params: tuple[str, ...]
    care_date: str | None


NOTHING: Term = AnyOf(())
EVERYTHING: Term = Not(NOTHING)


def to_term(formula: Formula, shape: TypeShape, member_tag: str) -> Term:
    """A store query term true exactly for the resources of ``shape.type`` for which
    ``formula`` holds. ``member_tag``: the system of the writer tag."""
    t = shape.type
    if isinstance(formula, Const):
        return EVERYTHING if formula.value else NOTHING
    if isinstance(formula, Label) and formula.loose:
        systems_, codes_ = zip(*sorted(formula.labels), strict=True)
        conds = (Cond("system", "in", tuple(sorted(set(systems_)))),)
        return Match("_security", (*conds, Cond("text", "in", tuple(sorted(set(codes_))))))
    if isinstance(formula, Label):
        systems: dict[str, list[str]] = {}
        for system, code in sorted(formula.labels):
            systems.setdefault(system, []).append(code)
        return _any(
            Match("_security", (Cond("system", "eq", s), Cond("text", "in", tuple(codes))))
            for s, codes in systems.items()
        )
    if isinstance(formula, Dated):
        within = (Cond("low", "ge", formula.low), Cond("low", "le", formula.high))
        updated = Match("_lastUpdated", within)
        if shape.care_date is None:
            return updated
        undated = _all(Not(Match(shape.care_date, ())), updated)
        return _any([Match(shape.care_date, within), undated])
    if isinstance(formula, Ids):
        ids = tuple(sorted(r.split("/", 1)[1] for r in formula.refs if r.startswith(f"{t}/")))
        return IdIn(ids) if ids else NOTHING
    if isinstance(formula, Refers):
        refs = tuple(sorted(formula.refs))
        return _any(Match(p, (Cond("text", "in", refs),)) for p in shape.reference_params)
    if isinstance(formula, Writer):
        org = formula.org.split("/", 1)[1]
        return Match("_tag", (Cond("system", "eq", member_tag), Cond("text", "eq", org)))
    if isinstance(formula, Concerns):
        if t == "Patient":
            return to_term(Ids(formula.refs), shape, member_tag)
        refs = tuple(sorted(formula.refs))
        return _any(Match(p, (Cond("text", "in", refs),)) for p in shape.patient_params)
    if isinstance(formula, Outside):
        if t == "Patient":
            return _not(to_term(Ids(formula.refs), shape, member_tag))
        conds = (Cond("text", "prefix", "Patient/"),)
        if formula.refs:
            conds += (Cond("text", "nin", tuple(sorted(formula.refs))),)
        return _any(Match(p, conds) for p in shape.patient_params)
    if isinstance(formula, Neg):
        return _not(to_term(formula.item, shape, member_tag))
    terms = [to_term(f, shape, member_tag) for f in sorted(formula.items, key=_order)]
    return _any(terms) if isinstance(formula, Or) else _all(*terms)


def _order(f: Formula) -> tuple[int, str]:
    """Cheap, selective checks first: the stores evaluate OR and AND left to right."""
    rank = {Writer: 0, Label: 1, Outside: 2, Concerns: 3, Ids: 3, Dated: 4, Refers: 5}
    return rank.get(type(f), 6), repr(f)


def _any(terms: Iterable[Term]) -> Term:
    terms = tuple(terms)
    return terms[0] if len(terms) == 1 else AnyOf(terms)


def _all(*terms: Term) -> Term:
    """AND inside a term: NOT (NOT a OR NOT b)."""
    return terms[0] if len(terms) == 1 else Not(AnyOf(tuple(_not(t) for t in terms)))


def _not(term: Term) -> Term:
    return term.term if isinstance(term, Not) else Not(term)


def visible_formula(
    acc: Accessor,
    groups: Mapping[Formula, frozenset[str]],
    consented: frozenset[str],
    withheld: frozenset[str] = frozenset(),
    named: frozenset[str] = frozenset(),
) -> Formula:
    """When a resource is visible to ``acc``: written by its organisation, or every
    patient it concerns permits it. ``groups``: for each permit formula other than the
    default's, the patients (Patient/id) whose Consents give it; ``consented``: all
    patients with such Consents; ``withheld``: patients among them whose resources
    are withheld whatever they are (those a filter narrowed to the ``named`` patients
    leaves out of ``groups``, met only in resources about a patient not named: the
    most restrictive reading)."""
    mine = Writer(acc.organization) if acc.organization else FALSE
    default = default_formula(acc)
    checks = [neg(conj(neg(default), Outside(consented)))]
    checks += [neg(conj(Concerns(refs), neg(f))) for f, refs in groups.items()]
    if withheld:
        checks.append(neg(conj(Outside(named), Concerns(withheld))))
    return disj(mine, conj(*checks))


def suspects(acc: Accessor, consented: frozenset[str]) -> Formula:
    """A superset of the resources :func:`visible_formula` may withhold, as a set the
    store can look up: those about a patient with Consents of their own for ``acc``
    and those the default policy may deny (sensitive ones; everything under opt-in
    or another purpose, and then it is no help: TRUE)."""
    maybe_denied = Label(SENSITIVE, loose=True) if acc.default_permits() else TRUE
    return disj(Concerns(consented) if consented else FALSE, maybe_denied)
