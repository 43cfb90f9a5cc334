"""Conformance data (resource type list, CapabilityStatement base), shipped as hie.conformance."""
