"""The generic FHIR R4 REST layer: knows FHIR, nothing about alliances."""
