"""Comparison levels of each field, and the conflicts that forbid an automatic link."""

from __future__ import annotations

from hie.mpi import RESIDENT_ID_SYSTEM, compare, gb11643_check_digit, normalize
from hie.mpi.compare import ID_CONFLICT, TWIN
from hie.mpi.normalize import OPAQUE, PLACEHOLDER_NAME, Record


def resident_id(first17: str) -> str:
    return first17 + gb11643_check_digit(first17)


ZHANG = resident_id("11010519800101003")  # male, 1980-01-01
ZHANG_TWIN = resident_id("11010519800101005")


def person(name="张伟", id_number=ZHANG, birth="1980-01-01", gender="male", **extra) -> Record:
    resource = {"name": [{"text": name}], "gender": gender, "birthDate": birth, **extra}
    if id_number:
        resource["identifier"] = [{"system": RESIDENT_ID_SYSTEM, "value": id_number}]
    return normalize(resource)


def levels(a: Record, b: Record) -> dict[str, str]:
    return compare(a, b).labelled()


def test_identical_records_agree_exactly():
    address = {"text": "北京市朝阳区建国路88号", "postalCode": "100020"}
    a = person(telecom=[{"value": "13912345678"}], address=[address])
    result = levels(a, a)
    assert set(result.values()) == {"exact"}
    assert not compare(a, a).conflict


def test_national_id_levels():
    assert levels(person(), person())["national_id"] == "exact"
    swapped = ZHANG[:15] + ZHANG[16] + ZHANG[15] + ZHANG[17:]  # fails its check digit
    suspect = person(id_number=swapped)
    assert suspect.id_suspect and not suspect.national_id
    assert levels(person(), suspect)["national_id"] == "close"
    missing_digit = person(id_number=ZHANG[:10] + ZHANG[11:])
    assert levels(person(), missing_digit)["national_id"] == "close"
    assert levels(suspect, missing_digit)["national_id"] == "missing"  # garbage vs garbage
    assert levels(person(), person(id_number=""))["national_id"] == "missing"
    twin = compare(person(), person(name="张强", id_number=ZHANG_TWIN))
    assert twin.labelled()["national_id"] == "different" and twin.conflict == ID_CONFLICT


def test_unchecked_national_ids_may_be_close():
    systems = {"urn:example:ssn": OPAQUE}

    def ssn(value: str) -> Record:
        return normalize(
            {"identifier": [{"system": "urn:example:ssn", "value": value}]}, id_systems=systems
        )

    assert levels(ssn("5304218"), ssn("5304218"))["national_id"] == "exact"
    assert levels(ssn("5304218"), ssn("5302418"))["national_id"] == "close"
    assert levels(ssn("5304218"), ssn("1234567"))["national_id"] == "different"
    assert not compare(ssn("5304218"), ssn("1234567")).conflict


def test_name_levels():
    base = person(id_number="")
    assert levels(base, person(name="張偉", id_number=""))["given"] == "exact"  # traditional
    homophone = levels(base, person(name="章玮", id_number=""))
    assert (homophone["family"], homophone["given"]) == ("close", "close")
    assert levels(base, person(name="张强", id_number=""))["given"] == "different"
    pinyin = levels(base, person(name="Wei Zhang", id_number=""))
    assert (pinyin["family"], pinyin["given"]) == ("close", "close")
    assert levels(base, normalize({"gender": "male"}))["family"] == "missing"


def test_western_name_levels_and_swaps():
    def name(family: str, given: str) -> Record:
        return normalize({"name": [{"family": family, "given": [given]}]})

    assert levels(name("neumann", "michaela"), name("neumann", "micheala"))["given"] == "close"
    assert levels(name("neumann", "michaela"), name("neuman", "michaela"))["family"] in (
        "close",
        "similar",
    )
    swapped = levels(name("neumann", "michaela"), name("michaela", "neumann"))
    assert (swapped["family"], swapped["given"]) == ("exact", "exact")
    assert levels(name("neumann", "michaela"), name("smith", "john"))["given"] == "different"


def test_birth_date_levels():
    def born(date: str) -> Record:
        return normalize({"birthDate": date})

    assert levels(born("1980-01-02"), born("1980-01-02"))["birth_date"] == "exact"
    assert levels(born("1980-01-02"), born("1980-02-01"))["birth_date"] == "close"  # swapped
    assert levels(born("1980-01-02"), born("1980-01-03"))["birth_date"] == "close"  # one digit
    assert levels(born("1980-01-12"), born("1980-01-21"))["birth_date"] == "close"  # transposed
    assert levels(born("1980-01-02"), born("1980-07-02"))["birth_date"] == "close"
    assert levels(born("1980-01-02"), born("1980-11-22"))["birth_date"] == "different"
    assert levels(born("1980-01-02"), born("1980-05-09"))["birth_date"] == "different"
    assert levels(born("1980-01-02"), born("1971-01-02"))["birth_date"] == "partial"
    assert levels(born("1980"), born("1980-01-02"))["birth_date"] == "partial"
    assert levels(born("1980"), born("1981-01-02"))["birth_date"] == "different"
    assert levels(born("1900-01-01"), born("1900-01-01"))["birth_date"] == "missing"


def test_phone_and_address_levels():
    def contact(phone: str, address: dict) -> Record:
        return normalize({"telecom": [{"value": phone}], "address": [address]})

    a = contact("13912345678", {"text": "北京市朝阳区建国路88号3单元402室", "postalCode": "100020"})
    b = contact("+86 139-1234-5678", {"line": ["建国路88号"], "district": "朝阳区"})
    c = contact("13912345687", {"text": "北京市海淀区学院路1号", "postalCode": "100080"})
    d = contact("13912345678", {"line": ["建国路88号3单元402室"], "city": "北京市"})
    ab, ac = levels(a, b), levels(a, c)
    assert (ab["phone"], ab["street"], ab["locality"], ab["postcode"]) == (
        "exact", "close", "exact", "missing")  # fmt: skip
    assert (ac["phone"], ac["street"], ac["locality"], ac["postcode"]) == (
        "close", "different", "different", "close")  # fmt: skip
    assert levels(b, d)["locality"] == "missing"  # a district is not compared with a city


def test_twins_conflict_without_ids():
    twin_a = person(name="李子涵", id_number="", gender="female")
    twin_b = person(name="李子豪", id_number="", gender="male")
    assert compare(twin_a, twin_b).conflict == TWIN
    swapped = normalize({"name": [{"family": "子豪", "given": ["李"]}], "birthDate": "1980-01-01"})
    assert compare(twin_a, swapped).conflict == TWIN
    assert not compare(twin_a, person(name="李子涵", id_number="", gender="female")).conflict


def test_placeholder_names_conflict():
    newborn = normalize({"name": [{"text": "王芳之子"}], "birthDate": "2025-01-02"})
    named = normalize({"name": [{"text": "李明"}], "birthDate": "2025-01-02"})
    assert PLACEHOLDER_NAME in newborn.flags
    assert compare(newborn, named).conflict == PLACEHOLDER_NAME


def test_a_mistyped_twin_number_does_not_lift_the_twin_rule():
    """Twins' resident ID numbers differ in their sequence digits: one twin's number with
    one digit mistyped (failing its check digit) is one digit away from the other twin's
    valid number. That closeness must not outweigh different given names."""
    near = person(name="张强", id_number=ZHANG[:16] + "9" + ZHANG[17])
    assert near.id_suspect and levels(person(), near)["national_id"] == "close"
    assert compare(person(), near).conflict == TWIN
    # the same closeness with the same given name is a typo of one person's number
    assert not compare(person(), person(id_number=ZHANG[:16] + "9" + ZHANG[17])).conflict


def test_close_unchecked_numbers_still_lift_the_twin_rule():
    """Without check digits (other national schemes) a near number is a typo's evidence."""
    systems = {"urn:example:ssn": OPAQUE}

    def ssn(value: str, given: str) -> Record:
        return normalize(
            {
                "identifier": [{"system": "urn:example:ssn", "value": value}],
                "name": [{"family": "Miller", "given": [given]}],
                "birthDate": "1970-01-01",
            },
            id_systems=systems,
        )

    assert not compare(ssn("5304218", "Joanna"), ssn("5302418", "Kate")).conflict
