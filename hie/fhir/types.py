"""Which FHIR R4 resource types the server serves, and their validating models.

The server speaks R4 (4.0.1) and validates with ``fhir.resources``' R4B models, which
accept R4 for every type listed here. Served = the R4 resource types that have an R4B
model with the same structure, minus types without a RESTful endpoint:

* no R4B model (R4B replaced them): the ``MedicinalProduct*`` family,
  ``SubstanceNucleicAcid``, ``SubstancePolymer``, ``SubstanceProtein``,
  ``SubstanceReferenceInformation``, ``SubstanceSourceMaterial``,
  ``SubstanceSpecification``, ``EffectEvidenceSynthesis``, ``RiskEvidenceSynthesis``;
* an R4B model of a different structure (rejects valid R4): ``Evidence``,
  ``EvidenceVariable``;
* no RESTful endpoint in R4: ``Parameters``.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from fhir.resources.R4B import get_fhir_model_class

RESTRUCTURED_IN_R4B = frozenset({"Evidence", "EvidenceVariable"})
NOT_RESTFUL = frozenset({"Parameters"})


@functools.cache
def r4_resource_types() -> tuple[str, ...]:
    """All concrete R4 resource types, from ``conformance/r4-resource-types.json``."""
    data = resources.files("hie.conformance").joinpath("r4-resource-types.json").read_bytes()
    return tuple(json.loads(data)["resourceTypes"])


def _has_model(name: str) -> bool:
    try:
        get_fhir_model_class(name)
    except (KeyError, ValueError, ImportError, AttributeError):
        return False
    return True


@functools.cache
def served_types() -> frozenset[str]:
    """The resource types with a RESTful endpoint on this server."""
    return frozenset(
        t
        for t in r4_resource_types()
        if t not in RESTRUCTURED_IN_R4B and t not in NOT_RESTFUL and _has_model(t)
    )


@functools.cache
def model(type_: str):
    """The R4B pydantic model class validating ``type_``."""
    return get_fhir_model_class(type_)
