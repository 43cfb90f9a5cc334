"""Member registrations for the MPI tests: valid resident ID numbers and Patients."""

from __future__ import annotations

from hie.mpi import RESIDENT_ID_SYSTEM, gb11643_check_digit


def resident_id(birth: str, seq: int, area: str = "110105") -> str:
    """A valid GB 11643 number (``seq`` odd: male, even: female)."""
    first17 = f"{area}{birth.replace('-', '')}{seq:03d}"
    return first17 + gb11643_check_digit(first17)


def person(
    family: str, given: str, birth: str, seq: int, phone: str | None = None, **extra
) -> dict:
    """A member's Patient: resident ID, official name, sex from ``seq``, birth date."""
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id(birth, seq)}],
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": "male" if seq % 2 else "female",
        "birthDate": birth,
    }
    if phone:
        body["telecom"] = [{"system": "phone", "value": phone}]
    body.update(extra)
    return body
