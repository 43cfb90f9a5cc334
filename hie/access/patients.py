"""Which patients a resource concerns: the input the access decision and the audit
record need. A resource concerns the patients its Patient-compartment parameters
reference (``Observation.subject``, ``Encounter.subject``...), and a Patient itself."""

from __future__ import annotations

from hie.fhir.search.extract import reference_key
from hie.fhir.search.registry import Registry


class PatientLinks:
    """Finds the patients of resources with a registry's compartment definition."""

    def __init__(self, registry: Registry, base: str | None = None):
        self._registry = registry
        self._base = base
        self._params = {
            t: tuple(p for p in params if p != "{def}")
            for t, params in registry.compartment("Patient").items()
        }

    def params(self, type_: str) -> tuple[str, ...]:
        """The parameters of ``type_`` that reference the patients it concerns."""
        known = self._registry.params(type_)
        return tuple(p for p in self._params.get(type_, ()) if p in known)

    def of(self, type_: str, resource: dict) -> list[str]:
        """The ``Patient/<id>`` references ``resource`` (of ``type_``) concerns."""
        if type_ == "Patient":
            return [f"Patient/{resource['id']}"] if isinstance(resource.get("id"), str) else []
        found: dict[str, None] = {}
        for code in self.params(type_):
            for node in self._registry.extractor(type_, code)(resource):
                value = node.value
                ref = value.get("reference") if isinstance(value, dict) else None
                if isinstance(ref, str):
                    key = reference_key(ref, self._base)
                    if key.startswith("Patient/"):
                        found[key] = None
        return list(found)
