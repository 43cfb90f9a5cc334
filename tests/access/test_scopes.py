"""Scope registration and negotiation (SMART v1 and v2 forms)."""

from __future__ import annotations

import pytest

from hie.access.scopes import check_scopes, negotiate


@pytest.mark.parametrize(
    ("requested", "registered", "granted"),
    [
        ("system/*.read", "system/*.rs", "system/*.read"),
        ("system/*.rs", "system/*.read", "system/*.rs"),
        ("system/Patient.rs", "system/*.cruds", "system/Patient.rs"),
        ("system/Patient.r", "system/Patient.rs", "system/Patient.r"),
        ("system/*.rs", "system/Patient.cruds", ""),
        ("system/Patient.cruds", "system/Patient.rs", ""),
        ("system/Patient.write", "system/*.cud", "system/Patient.write"),
        ("system/Patient.*", "system/*.cruds", "system/Patient.*"),
        ("user/Patient.rs", "system/*.cruds", ""),
        ("patient/Patient.rs", "system/*.cruds", ""),
        ("system/Observation.rs?category=laboratory", "system/*.cruds", ""),
        ("openid fhirUser system/Patient.s", "system/Patient.rs", "system/Patient.s"),
        ("system/Patient.rs  system/Patient.rs", "system/Patient.rs", "system/Patient.rs"),
        ("", "system/*.cruds", ""),
    ],
)
def test_negotiate(requested, registered, granted):
    assert negotiate(requested, registered) == granted


def test_check_scopes():
    assert check_scopes(" system/*.rs  user/Patient.cruds system/*.rs ") == (
        "system/*.rs user/Patient.cruds"
    )
    for bad in ("", "openid", "patient/*.rs", "system/Observation.rs?code=x", "system/patient.rs"):
        with pytest.raises(ValueError):
            check_scopes(bad)
