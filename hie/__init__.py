"""HIE: a FHIR R4 health information exchange server for medical alliances."""

__version__ = "0.1.0"
