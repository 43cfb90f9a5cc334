"""Every parameter of every served type, given odd values, parses or is a 400."""

from __future__ import annotations

import pytest

from hie.fhir.errors import FhirError
from hie.fhir.search.params import parse_search
from hie.fhir.search.registry import Registry
from hie.fhir.types import served_types

VALUES = ["x", "1", "ge2020", "a|b", "a|b|c", "a$b", "\\", ",", "eq", "1e400", "张", '{"$gt":1}']
MODIFIERS = ["", ":missing", ":exact", ":text", ":not", ":below", ":identifier", ":Patient"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry()


def test_no_parameter_value_or_modifier_crashes_the_parser(registry):
    parsed = rejected = 0
    for type_ in sorted(served_types()):
        for code in registry.params(type_):
            for modifier in MODIFIERS:
                for value in VALUES:
                    try:
                        parse_search(
                            type_,
                            [(code + modifier, value)],
                            default_count=10,
                            max_count=10,
                            strict=True,
                            registry=registry,
                        )
                        parsed += 1
                    except FhirError as exc:
                        assert exc.status == 400, (type_, code, modifier, value)
                        rejected += 1
    assert parsed > 10_000 and rejected > 10_000
