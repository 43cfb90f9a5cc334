"""``_summary`` and ``_elements``: returning a subset of a resource, marked SUBSETTED."""

from __future__ import annotations

import functools

from hie.fhir.errors import error
from hie.fhir.types import model

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "As requested, resource is not fully detailed",
}
SUMMARY_MODES = ("true", "false", "text", "data", "count")
_ALWAYS = ("resourceType", "id", "meta")


@functools.cache
def _elements(type_: str) -> tuple[frozenset[str], frozenset[str]]:
    """(summary elements, mandatory elements) of ``type_`` by JSON name, with the
    ``_x`` primitive-extension siblings of each."""
    summary, mandatory = set(), set()
    for name, field in model(type_).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        alias = field.alias or name
        if extra.get("summary_element_property"):
            summary.update((alias, f"_{alias}"))
        if extra.get("element_required") or extra.get("one_of_many_required"):
            mandatory.update((alias, f"_{alias}"))
    return frozenset(summary), frozenset(mandatory)


def check_summary(value: str | None) -> str | None:
    """Validate a ``_summary`` value (None or ``false`` mean no subsetting)."""
    if value is None:
        return None
    if value not in SUMMARY_MODES:
        raise error(400, "invalid", f"_summary must be one of {', '.join(SUMMARY_MODES)}")
    return None if value == "false" else value


def parse_elements(value: str | None) -> frozenset[str] | None:
    """The top-level element names of an ``_elements`` value."""
    if value is None:
        return None
    names = frozenset(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise error(400, "invalid", "_elements needs at least one element name")
    return names


def shape(resource: dict, summary: str | None, elements: frozenset[str] | None) -> dict:
    """The subset of ``resource`` that ``_summary``/``_elements`` ask for."""
    type_ = resource["resourceType"]
    summary_set, mandatory = _elements(type_)
    if summary == "text":
        keep = {"text", *mandatory}
    elif summary == "data":
        keep = {k for k in resource if k != "text"}
    elif summary == "true":
        keep = set(summary_set)
    else:
        keep = set(mandatory)
        keep.update(elements or ())
        keep.update(f"_{e}" for e in elements or ())
    out = {k: v for k, v in resource.items() if k in keep or k in _ALWAYS}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return out
