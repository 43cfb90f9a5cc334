"""Validation of incoming resources: JSON syntax, the rules the R4B models cannot see
(type and id against the URL, id syntax), then structural validation with the models.

Errors are :class:`FhirError` with issues whose ``expression`` locates the fault in
FHIRPath (``Patient.name[0].family``). Status codes follow the FHIR REST spec: 400
for what is not a resource of the right type at all, 422 for a resource that breaks
the rules of its type.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from hie import jsonio
from hie.fhir.errors import FhirError, Issue, error
from hie.fhir.types import model, served_types

ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_SMALL_INT_RE = re.compile(r"[0-9]{1,9}")
MAX_ISSUES = 50
_EXTENSION_LISTS = frozenset({"extension", "modifierExtension"})


def small_int(text: str) -> int | None:
    """The value of 1-9 ASCII digits (version numbers, counts), else None: Unicode digits
    such as ``"²"`` pass ``str.isdigit`` but not ``int``."""
    return int(text) if _SMALL_INT_RE.fullmatch(text) else None


def valid_id(value: object) -> bool:
    """True for a syntactically valid FHIR logical id."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def parse_json(body: bytes) -> Any:
    """Parse a request body, answering 400 with the parser's message if malformed."""
    if not body:
        raise error(400, "invalid", "The request body is empty; a JSON resource is required")
    try:
        return jsonio.loads(body)
    except (ValueError, RecursionError) as exc:  # orjson's and json's errors, bad UTF-8
        raise error(400, "invalid", f"Malformed JSON: {exc}") from None


def check_resource(resource: Any, expected_type: str | None = None, where: str = "") -> str:
    """Validate ``resource`` fully and return its type.

    ``expected_type`` is the type named by the URL (None in bundle entries that
    name no type). ``where`` prefixes expressions (for example ``Bundle.entry[3]``).
    """
    if not isinstance(resource, dict):
        raise error(400, "structure", "The body is not a JSON object (a FHIR resource)")
    type_ = resource.get("resourceType")
    if not isinstance(type_, str):
        raise error(400, "structure", "The resource has no resourceType", where or "Resource")
    if expected_type is not None and type_ != expected_type:
        raise error(
            400,
            "invalid",
            f"resourceType {type_!r} does not match the type {expected_type!r} in the URL",
            f"{where or type_}.resourceType",
        )
    if type_ not in served_types():
        raise error(400, "not-supported", f"Resource type {type_!r} is not supported")
    if "id" in resource and not valid_id(resource["id"]):
        raise error(
            400,
            "value",
            f"Invalid id {resource['id']!r}: 1-64 characters of A-Z, a-z, 0-9, '-' and '.'",
            f"{where or type_}.id",
        )
    issues = structural_issues(resource, type_, where or type_)
    if issues:
        raise FhirError(422, issues)
    return type_


def structural_issues(resource: dict, type_: str, root: str) -> list[Issue]:
    """Issues found by the R4B model of ``type_``; empty when the resource is valid."""
    try:
        model(type_).model_validate(resource)
        return []
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # The models raise these for some shapes, e.g. a contained resource of an
        # unknown type ('R4.FooType'); still the client's fault, never a 500.
        return [
            Issue(
                "structure", f"The content cannot be read as {type_}: {exc!r}", expression=(root,)
            )
        ]
    errors = [e for e in errors if not _model_false_positive(e, resource)]
    if not errors:
        return []
    issues = [
        Issue(
            "structure" if e["type"] == "extra_forbidden" else "value",
            _message(e),
            expression=(_fhirpath(root, e["loc"]),),
        )
        for e in errors[:MAX_ISSUES]
    ]
    if len(errors) > MAX_ISSUES:
        issues.append(Issue("too-costly", f"{len(errors) - MAX_ISSUES} further errors omitted"))
    return issues


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return f"Unknown element {err['loc'][-1]!r}"
    return err["msg"]


def _fhirpath(root: str, loc: tuple) -> str:
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}"
    return path


def _model_false_positive(err: dict, resource: dict) -> bool:
    """True for an error of the R4B models that R4 itself does not raise."""
    return _xml_whitespace_ok(err, resource) or _primitive_extension_of_extension(err, resource)


def _xml_whitespace_ok(err: dict, resource: dict) -> bool:
    r"""FHIR's regexes (``code``: ``[^\s]+(\s[^\s]+)*``) use XML Schema's ``\s``,
    which is ASCII whitespace only; Python's ``\s`` also matches U+00A0 and other
    Unicode spaces, so the models reject valid codes such as ``"CHEST\u00a0"``."""
    if err["type"] != "string_pattern_mismatch":
        return False
    value = _lookup(resource, err["loc"])
    return (
        isinstance(value, str) and re.fullmatch(err["ctx"]["pattern"], value, re.ASCII) is not None
    )


def _primitive_extension_of_extension(err: dict, resource: dict) -> bool:
    """Work around the R4B Extension model, which lacks ``_valueString`` and the other
    primitive-extension siblings of ``value[x]`` that R4 JSON allows (with or without
    the value itself). True when ``err`` is such an element and that element itself is
    a valid ``Element``."""
    loc = err["loc"]
    key = loc[-1] if loc else None
    if (
        err["type"] != "extra_forbidden"
        or not isinstance(key, str)
        or not key.startswith("_value")
        or len(loc) < 3
        or loc[-3] not in _EXTENSION_LISTS
        or key[1:] not in model("Extension").model_fields
    ):
        return False
    try:
        model("Element").model_validate(_lookup(resource, loc))
    except ValidationError:
        return False
    return True


def _lookup(node: Any, loc: tuple) -> Any:
    for part in loc:
        node = node[part]
    return node
