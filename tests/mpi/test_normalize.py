"""Normalisation: resident ID numbers, phones, names, placeholders and garbage input."""

from __future__ import annotations

import datetime as dt

import pytest

from hie.mpi import (
    RESIDENT_ID_SYSTEM,
    blocking_keys,
    canonical_phone,
    gb11643_check_digit,
    is_valid_resident_id,
    normalize,
    parse_resident_id,
)

STANDARD_EXAMPLE = "11010519491231002X"  # GB 11643-1999's own example


def patient(**fields) -> dict:
    """A Patient with a resident ID identifier when ``id`` is given."""
    resource = {"resourceType": "Patient", **fields}
    if "id" in fields:
        del resource["id"]
        resource["identifier"] = [{"system": RESIDENT_ID_SYSTEM, "value": fields["id"]}]
    return resource


@pytest.mark.parametrize(
    ("first17", "check"),
    [
        ("11010519491231002", "X"),
        ("44010619900101001", "3"),
        ("31010419850615123", "7"),
        ("11010120000229004", "2"),
        ("51010719700101001", "9"),
    ],
)
def test_check_digit(first17, check):
    assert gb11643_check_digit(first17) == check
    assert is_valid_resident_id(first17 + check)


@pytest.mark.parametrize(
    "value",
    [
        "11010519491231002x",  # lower-case x
        "110105 19491231 002X",  # spaces
        "１１０１０５１９４９１２３１００２Ｘ",  # full width
    ],
)
def test_resident_id_forms(value):
    parsed = parse_resident_id(value)
    assert parsed.valid and parsed.number == STANDARD_EXAMPLE


@pytest.mark.parametrize(
    ("value", "flag"),
    [
        ("110105194912310021", "id-checksum"),  # wrong check digit
        ("110105194912130022", "id-checksum"),  # two digits swapped
        ("11010519491231002", "id-length"),  # a digit missing
        ("11010519491231002XX", "id-length"),
        ("1101051949123100AX", "id-characters"),
        ("ABCDEFGHIJKLMNOPQR", "id-characters"),
        ("110105" + "20990101" + "001" + gb11643_check_digit("11010520990101001"), None),
        ("110105" + "19490230" + "002" + gb11643_check_digit("11010519490230002"), None),
    ],
)
def test_invalid_resident_ids(value, flag):
    parsed = parse_resident_id(value)
    assert not parsed.valid
    if flag:
        assert flag in parsed.flags
    else:
        assert "id-birthdate-invalid" in parsed.flags


def test_resident_id_birth_date_and_sex():
    parsed = parse_resident_id(STANDARD_EXAMPLE)
    assert (parsed.birth_date, parsed.sex) == ("19491231", "female")  # sequence 002: even
    male = "44010619900101001"
    assert parse_resident_id(male + gb11643_check_digit(male)).sex == "male"


def test_fifteen_digit_number_is_converted():
    parsed = parse_resident_id("110105491231002")
    assert parsed.valid and parsed.number == STANDARD_EXAMPLE
    assert "id-15-digit" in parsed.flags


def test_id_cross_checks():
    ok = normalize(patient(id=STANDARD_EXAMPLE, birthDate="1949-12-31", gender="female"))
    assert ok.national_id == STANDARD_EXAMPLE and ok.id_checked and not ok.flags
    filled = normalize(patient(id=STANDARD_EXAMPLE))
    assert (filled.birth_date, filled.sex) == ("19491231", "female")
    assert "birthdate-from-id" in filled.flags
    typo = normalize(patient(id=STANDARD_EXAMPLE, birthDate="1949-12-13"))
    assert typo.national_id and typo.birth_date == "19491231"
    assert "id-birthdate-typo" in typo.flags
    # a relative's number (an infant under the mother's): flagged and not trusted
    mother = normalize(patient(id=STANDARD_EXAMPLE, birthDate="2024-03-01"))
    assert not mother.national_id and not mother.id_suspect
    assert "id-birthdate-mismatch" in mother.flags and mother.birth_date == "20240301"
    brother = normalize(patient(id=STANDARD_EXAMPLE, gender="male"))
    assert not brother.national_id and "id-sex-mismatch" in brother.flags


def test_invalid_id_is_flagged_and_kept_only_as_suspect():
    record = normalize(patient(id="110105194912130022", birthDate="1949-12-31"))
    assert not record.national_id and record.id_suspect == "110105194912130022"
    assert "id-checksum" in record.flags
    assert not any(
        k.startswith("id:") and k != "id:" + "".join(sorted(record.id_suspect))
        for k in blocking_keys(record)
    )


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("13912345678", "13912345678"),
        ("139-1234-5678", "13912345678"),
        ("+86 139 1234 5678", "13912345678"),
        ("0086 13912345678", "13912345678"),
        ("8613912345678", "13912345678"),
        ("010-6512 3456", "01065123456"),
        ("(010)65123456", "01065123456"),
        ("+86 10 6512 3456", "01065123456"),
        ("+86-0755-8888 1234", "075588881234"),
        ("010-65123456 转 801", "01065123456"),
        ("6512-3456", "65123456"),
        ("04 1234 5678", "0412345678"),
        ("00000000", ""),
        ("12345678", ""),
        ("13800138000", ""),
        ("11111111111", ""),
        ("12912345678", ""),  # no such mobile prefix
        ("123", ""),
        ("not a phone", ""),
    ],
)
def test_canonical_phone(value, canonical):
    assert canonical_phone(value) == canonical


def test_han_names_folded_and_romanised():
    record = normalize(patient(name=[{"text": "單田芳"}]))
    assert (record.family, record.given) == ("单", "田芳")
    assert (record.family_roman, record.given_roman) == ("shan", "tianfang")
    assert record.han
    assert normalize(patient(name=[{"family": "曾", "given": ["国藩"]}])).family_roman == "zeng"
    assert normalize(patient(name=[{"family": "区"}])).family_roman == "ou"
    trad = normalize(patient(name=[{"family": "張", "given": ["偉"]}]))
    simp = normalize(patient(name=[{"text": "张伟"}]))
    assert (trad.family, trad.given) == (simp.family, simp.given) == ("张", "伟")


def test_western_names():
    record = normalize(patient(name=[{"family": "O'Brien", "given": ["Mary", "Ann"]}]))
    assert (record.family, record.given) == ("o'brien", "mary ann")
    assert (record.family_roman, record.given_roman) == ("obrien", "maryann")
    assert not record.han


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"birthDate": "1900-01-01"}, "birthdate-placeholder"),
        ({"birthDate": "0001-01-01"}, "birthdate-absurd"),
        ({"birthDate": (dt.date.today() + dt.timedelta(days=2)).isoformat()}, "birthdate-absurd"),
        ({"birthDate": "1980-02-30"}, "birthdate-invalid"),
        ({"birthDate": "19800101"}, "birthdate-invalid"),
        ({"telecom": [{"system": "phone", "value": "00000000"}]}, "phone-unusable"),
        ({"name": [{"text": "新生儿"}]}, "name-placeholder"),
        ({"name": [{"text": "无名氏3号"}]}, "name-placeholder"),
        ({"name": [{"text": "王芳之子"}]}, "name-placeholder"),
        ({"name": [{"family": "Unknown"}]}, "name-placeholder"),
        ({"name": [{"family": "Doe", "given": ["John"]}]}, "name-placeholder"),
        ({"name": [{"given": ["Baby"], "family": "Smith"}]}, "name-placeholder"),
        ({"address": [{"text": "不详"}]}, "address-placeholder"),
    ],
)
def test_placeholders_are_flagged_and_dropped(fields, flag):
    record = normalize(patient(**fields))
    assert flag in record.flags
    assert not (record.family or record.given or record.birth_date or record.phones)
    assert not record.street
    assert blocking_keys(record) == []


GARBAGE = [
    None,
    "Patient",
    [],
    {},
    {"resourceType": "Patient"},
    {"name": [{"text": "张" * 10_000}], "birthDate": "1980-01-01"},
    {"name": [{"family": "x" * 10_000, "given": ["y" * 10_000]}]},
    {"name": "张三", "identifier": "110105", "telecom": {"value": 1}, "address": "北京"},
    {"name": [None, 1, {"given": "not a list"}, {"family": 5}], "gender": ["male"]},
    {"identifier": [{"system": RESIDENT_ID_SYSTEM, "value": "ABC1234567890XYZ12"}]},
    {"identifier": [{"system": RESIDENT_ID_SYSTEM, "value": "1" * 10_000}]},
    {"identifier": [{"system": RESIDENT_ID_SYSTEM, "value": 110105194912310021}]},
    {"identifier": [{"system": ["x"], "value": "y"}, {"type": "z"}]},
    {"birthDate": 19800101},
    {"birthDate": "9999-12-31"},
    {"telecom": [{"system": "phone", "value": "+" * 5000}, None, {"value": 13912345678}]},
    {"address": [{"line": [None, 5], "city": ["x"], "postalCode": 100020}]},
    {"address": [{"text": "北" * 10_000}]},
    {"name": [{"text": "🙂🙃 ∑∫ Ωμέγα Ж"}]},
    {"name": [{"text": "\u200b\u200b"}]},
]


@pytest.mark.parametrize("resource", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_never_crashes_nor_keys(resource):
    record = normalize(resource)
    keys = blocking_keys(record)
    assert all(len(k) < 200 for k in keys)
    assert not record.national_id and not record.phones
    if not isinstance(resource, dict) or not resource.get("name"):
        assert keys == []


def test_garbage_is_flagged():
    assert normalize(None).flags == ("not-a-patient",)
    assert "no-identifying-data" in normalize({}).flags
    long_name = normalize({"name": [{"text": "张" * 10_000}]})
    assert "name-too-long" in long_name.flags and not long_name.family
    letters = normalize(patient(id="1101051949123100AX"))
    assert "id-characters" in letters.flags and not letters.id_suspect


def test_chinese_address_to_division():
    text = normalize(patient(address=[{"text": "广东省广州市越秀区中山五路1号3单元"}]))
    fields = normalize(
        patient(
            address=[
                {
                    "line": ["中山五路1号3单元"],
                    "district": "越秀区",
                    "city": "广州市",
                    "state": "广东省",
                    "postalCode": "510030",
                }
            ]
        )
    )
    assert (text.locality, text.street) == (fields.locality, fields.street)
    assert (fields.locality, fields.street, fields.postcode) == (
        "越秀区",
        "中山五路1号3单元",
        "510030",
    )
    city_only = normalize(patient(address=[{"text": "北京市朝阳区建国路88号", "city": "北京市"}]))
    assert (city_only.locality, city_only.street) == ("朝阳区", "建国路88号")
    plain = normalize(patient(address=[{"text": "望京花园小区3号楼"}]))
    assert (plain.locality, plain.street) == ("", "望京花园小区3号楼")
