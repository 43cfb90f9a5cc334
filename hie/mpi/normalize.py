"""A FHIR Patient as a :class:`Record`: the normal forms the master patient index matches on.

Nothing here raises on bad input. Data that cannot be trusted is left out of the record and
named in :attr:`Record.flags` (``id-checksum``, ``birthdate-placeholder``, ...), so that it
neither creates a blocking key nor counts as evidence for a link.

Resident identity numbers (居民身份证号码, GB 11643) are read from identifiers whose system is
in :data:`ID_SYSTEMS` (or whose type is HL7 v2-0203 ``NNCHN``). The system the alliance uses
is :data:`RESIDENT_ID_SYSTEM`, ``urn:oid:2.16.156.10011.1.3``: the OID of the resident ID
number in the national health information standards (WS/T 500 shared documents, and the
Chinese HIS/CDA integrations built on them). Identifiers of other national schemes without a
check digit can be matched on too by passing ``id_systems`` (the FEBRL evaluation does so).
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace

from hie.fhir.search.text import _split_text, fold, phonetic

RESIDENT_ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"
"""Identifier system of the Chinese resident ID number (GB 11643), as the alliance sends it."""

GB11643 = "gb11643"
OPAQUE = "opaque"
ID_SYSTEMS: Mapping[str, str] = {RESIDENT_ID_SYSTEM: GB11643}
"""Identifier systems matched as a national person identifier, and how each is checked:
:data:`GB11643` (check digit, birth date and sex cross-checked) or :data:`OPAQUE` (as is)."""

_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_NNCHN = "NNCHN"  # HL7 v2-0203: national person identifier where the country is China

PLACEHOLDER_NAME = "name-placeholder"
MAX_NAME = 40
MAX_ADDRESS = 200
EARLIEST_BIRTH = dt.date(1880, 1, 1)

_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")
_NAME_NOISE = re.compile(r"[\d@#$%^&*_=+<>{}\[\]|\\/?!:;\"]")
_PLACEHOLDER_NAMES = frozenset(
    {
        "新生儿",
        "无名氏",
        "无名",
        "未知",
        "不详",
        "待定",
        "婴儿",
        "男婴",
        "女婴",
        "某某",
        "患者",
        "病人",
        "测试",
        "匿名",
        "unknown",
        "unk",
        "anonymous",
        "johndoe",
        "janedoe",
        "doejohn",
        "doejane",
        "baby",
        "babyboy",
        "babygirl",
        "infant",
        "newborn",
        "test",
        "testpatient",
        "patient",
        "none",
        "null",
        "nn",
        "xx",
        "xxx",
    }
)
_PLACEHOLDER_SUFFIX = re.compile("(之子|之女|之婴|之儿|新生儿|婴儿?|男婴|女婴)$")
_PLACEHOLDER_NUMBERED = re.compile(r"(无名氏?|未知|患者|病人)[\d一二三四五六七八九十甲乙丙丁号]*")
_NAME_SEPARATORS = re.compile(r"[\s.·'-]+")
_PLACEHOLDER_DATES = frozenset({"19000101", "18991231", "1900"})
_PLACEHOLDER_PHONES = frozenset({"13800138000", "12345678", "123456789", "1234567890"})
_PLACEHOLDER_TEXT = frozenset(
    {
        "不详",
        "未知",
        "无",
        "暂无",
        "不明",
        "unknown",
        "none",
        "null",
        "na",
        "n/a",
        "-",
        "--",
        "?",
        "0",
    }
)

_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_ID_SEPARATORS = re.compile(r"[\s\-]+")
_ID_WEIGHTS = [pow(2, 17 - i, 11) for i in range(17)]
_ID_CHECK = "10X98765432"
_MOBILE = re.compile(r"1[3-9]\d{9}")
_PHONE_EXTENSION = re.compile(r"(?:ext\.?|转|x|#)\s*\d+$", re.IGNORECASE)
_DIVISIONS = re.compile(
    r"(?P<province>.{2,7}?(?:省|自治区|特别行政区))?"
    r"(?P<city>.{1,8}?(?:市|自治州|地区|盟))?"
    r"(?P<county>.{1,8}?(?:区|县|市|旗))?"
)


@dataclass(frozen=True, slots=True)
class Record:
    """The matchable normal form of one patient record. Empty string: unknown or untrusted.

    Names are folded (simplified Han, lower case; given names joined) and romanised
    (toneless pinyin with surname readings for Han, letters for other scripts). The birth
    date is ``YYYYMMDD`` (or ``YYYYMM``/``YYYY`` when only that much is known). A national
    ID is ``national_id`` when trusted (``id_checked`` when a check digit verified it);
    a resident ID number of 17-19 digits that fails its check digit or length is kept as
    ``id_suspect``: it never agrees as an ID, it only counts as "close" to a trusted number
    one typo away (and blocks by its sorted digits, which a transposition keeps). Phones are
    canonical digits. ``locality`` is the district/county (or, outside China, the city or
    suburb); ``street`` the rest of the address.
    """

    family: str = ""
    given: str = ""
    family_roman: str = ""
    given_roman: str = ""
    han: bool = False
    birth_date: str = ""
    sex: str = ""
    national_id: str = ""
    id_checked: bool = False
    id_suspect: str = ""
    phones: tuple[str, ...] = ()
    street: str = ""
    locality: str = ""
    postcode: str = ""
    flags: tuple[str, ...] = ()

    @property
    def identifying(self) -> bool:
        """Whether the record has anything a person can be told apart by."""
        return bool(
            self.national_id
            or self.phones
            or ((self.family or self.given) and (self.birth_date or self.street))
        )


def gb11643_check_digit(first17: str) -> str:
    """The GB 11643 (ISO 7064 MOD 11-2) check character of the first 17 digits."""
    return _ID_CHECK[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def _date(yyyymmdd: str) -> dt.date | None:
    try:
        return dt.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
    except ValueError:
        return None


def _plausible_birth(day: dt.date | None) -> bool:
    return day is not None and EARLIEST_BIRTH <= day <= dt.date.today()


@dataclass(frozen=True, slots=True)
class ResidentId:
    """A resident ID number read by :func:`parse_resident_id`.

    ``number`` is the canonical 18-character form when ``valid`` (a 15-digit first-generation
    number is converted), else the cleaned input. ``birth_date`` and ``sex`` are what a valid
    number encodes. ``flags`` say what is wrong or was converted.
    """

    number: str
    valid: bool
    birth_date: str = ""
    sex: str = ""
    flags: tuple[str, ...] = ()


def parse_resident_id(value: str) -> ResidentId:
    """Check a resident ID number: length, characters, birth date and GB 11643 check digit.

    Full-width characters, spaces and dashes are tolerated and a lower-case ``x`` is read
    as ``X``. A 15-digit number (issued before 1999) is converted to 18 digits.
    """
    number = _ID_SEPARATORS.sub("", unicodedata.normalize("NFKC", value)).upper()
    flags: list[str] = []
    if len(number) == 15 and number.isdigit():
        number = number[:6] + "19" + number[6:]
        number += gb11643_check_digit(number)
        flags.append("id-15-digit")
    if len(number) != 18:
        return ResidentId(number, False, flags=("id-length",))
    if not (number[:17].isdigit() and (number[17].isdigit() or number[17] == "X")):
        return ResidentId(number, False, flags=("id-characters",))
    if number[17] != gb11643_check_digit(number[:17]):
        return ResidentId(number, False, flags=("id-checksum",))
    birth = number[6:14]
    if number[0] == "0" or not _plausible_birth(_date(birth)):
        return ResidentId(number, False, flags=(*flags, "id-birthdate-invalid"))
    if len(set(number[:17])) == 1:
        return ResidentId(number, False, flags=(*flags, "id-placeholder"))
    sex = "male" if int(number[16]) % 2 else "female"
    return ResidentId(number, True, birth, sex, tuple(flags))


def is_valid_resident_id(value: str) -> bool:
    """Whether ``value`` is a valid 18-character resident ID number (check digit included)."""
    return isinstance(value, str) and len(value.strip()) == 18 and parse_resident_id(value).valid


def canonical_phone(value: str) -> str:
    """Digits of a phone number in one form for matching, or ``""`` when not a usable number.

    Chinese numbers: the country code (``+86``, ``0086``) dropped; a mobile number as its 11
    digits (``13912345678``); a landline as its area code with the trunk ``0`` and the local
    number (``+86 10 6512-3456`` and ``010-65123456`` -> ``01065123456``); extensions
    dropped. Other numbers: their digits. Placeholders (all one digit, ``12345678``,
    ``13800138000``) and impossible mobile numbers are not usable.
    """
    s = _PHONE_EXTENSION.sub("", unicodedata.normalize("NFKC", value).strip())
    digits = "".join(c for c in s if c.isdigit())
    if s.startswith("+") or s.startswith("00"):
        digits = digits.removeprefix("00")
        if digits.startswith("86"):
            digits = digits[2:]
            if not _MOBILE.fullmatch(digits):  # area code written without its trunk 0
                digits = "0" + digits.removeprefix("0")
    elif len(digits) == 13 and digits.startswith("86") and _MOBILE.fullmatch(digits[2:]):
        digits = digits[2:]
    if not 7 <= len(digits) <= 15 or len(set(digits)) == 1 or digits in _PLACEHOLDER_PHONES:
        return ""
    if len(digits) == 11 and digits[0] == "1" and not _MOBILE.fullmatch(digits):
        return ""
    return digits


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _dicts(value: object) -> list[dict]:
    return [v for v in _list(value) if isinstance(v, dict)]


def _pick(items: list[dict], skip: tuple[str, ...]) -> dict | None:
    """The first item whose ``use`` is official, then usual, then any but ``skip``."""
    usable = [i for i in items if _str(i.get("use")) not in skip]
    for use in ("official", "usual"):
        for item in usable:
            if item.get("use") == use:
                return item
    return usable[0] if usable else None


def _name(patient: dict, flags: list[str]) -> tuple[str, str, str, str, bool]:
    """(family, given, family romanised, given romanised, written in Han) of the patient."""
    name = _pick(_dicts(patient.get("name")), ("old", "anonymous", "maiden"))
    if name is None:
        return "", "", "", "", False
    family, text = _str(name.get("family")), _str(name.get("text"))
    givens = [g for g in _list(name.get("given")) if isinstance(g, str)]
    if max(len(family), len(text), *map(len, givens), 0) > MAX_NAME * 2:
        flags.append("name-too-long")
        return "", "", "", "", False
    family, givens = fold(family), [fold(g) for g in givens]
    if not family and not any(givens) and text:
        family, givens = _split_text(fold(text))
    parts = [p for p in (family, *givens) if p]
    if not parts:
        return "", "", "", "", False
    han = any(_HAN.search(p) for p in parts)
    given = ("" if han else " ").join(g for g in givens if g)
    if max(len(family), len(given)) > MAX_NAME:
        flags.append("name-too-long")
        return "", "", "", "", False
    whole = _NAME_SEPARATORS.sub("", family + given)
    if (
        whole in _PLACEHOLDER_NAMES
        or given in _PLACEHOLDER_NAMES
        or family in _PLACEHOLDER_NAMES
        or _PLACEHOLDER_SUFFIX.search(whole)
        or _PLACEHOLDER_NUMBERED.fullmatch(whole)
    ):
        flags.append(PLACEHOLDER_NAME)
        return "", "", "", "", False
    if _NAME_NOISE.search(family + given):
        flags.append("name-invalid")
        return "", "", "", "", False
    family_roman = phonetic(family, surname=True) if family else ""
    given_roman = phonetic(given) if given else ""
    return family, given, family_roman, given_roman, han


def _birth_date(value: object, flags: list[str]) -> str:
    """A FHIR birthDate as ``YYYYMMDD``/``YYYYMM``/``YYYY``, or ``""`` with a flag."""
    if value is None:
        return ""
    match = _DATE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        flags.append("birthdate-invalid")
        return ""
    year, month, day = match.groups()
    digits = year + (month or "") + (day or "")
    if digits in _PLACEHOLDER_DATES:
        flags.append("birthdate-placeholder")
        return ""
    check = _date(year + (month or "01") + (day or "01"))
    if check is None:
        flags.append("birthdate-invalid")
        return ""
    if not (EARLIEST_BIRTH.year <= check.year and check <= dt.date.today()):
        flags.append("birthdate-absurd")
        return ""
    return digits


def _near_date(a: str, b: str) -> bool:
    """Whether two ``YYYYMMDD`` dates differ by one digit, two adjacent digits swapped, or
    day and month swapped."""
    diff = [i for i in range(8) if a[i] != b[i]]
    swapped = (
        len(diff) == 2
        and diff[1] == diff[0] + 1
        and a[diff[0]] + a[diff[1]] == (b[diff[1]] + b[diff[0]])
    )
    return len(diff) == 1 or swapped or (a[:4] + a[4:6] + a[6:8] == b[:4] + b[6:8] + b[4:6])


def _identifier_scheme(identifier: dict, id_systems: Mapping[str, str]) -> str:
    system = _str(identifier.get("system"))
    if system in id_systems:
        return id_systems[system]
    type_ = identifier.get("type")
    codings = _dicts(type_.get("coding")) if isinstance(type_, dict) else []
    if any(c.get("system") == _V2_0203 and c.get("code") == _NNCHN for c in codings):
        return GB11643
    return ""


def _national_id(
    patient: dict, id_systems: Mapping[str, str], birth: str, sex: str, flags: list[str]
) -> tuple[str, bool, str, str, str]:
    """(trusted id, checked, suspect id, birth date, sex) after cross-checking the ID number.

    A valid resident ID fills a missing birth date or sex and corrects a birth date that
    differs from its own by a typo. It is not trusted when its birth date or sex contradicts
    the record's: it may be a relative's (an infant registered under the mother's number).
    """
    opaque, suspect = "", ""
    for identifier in _dicts(patient.get("identifier")):
        scheme = _identifier_scheme(identifier, id_systems)
        value = _str(identifier.get("value")).strip()
        if not scheme or not value:
            continue
        if scheme == OPAQUE:
            if not opaque and 0 < len(value) <= 64 and len(set(value)) > 1:
                opaque = unicodedata.normalize("NFKC", value).upper()
            continue
        if len(value) > 64:
            flags.append("id-length")
            continue
        rid = parse_resident_id(value)
        flags.extend(rid.flags)
        if not rid.valid:
            digits = rid.number[:-1].isdigit() and (
                rid.number[-1].isdigit() or rid.number[-1] == "X"
            )
            if not suspect and digits and 17 <= len(rid.number) <= 19 and len(set(rid.number)) > 2:
                suspect = rid.number
            continue
        if birth and birth != rid.birth_date[: len(birth)]:
            if len(birth) == 8 and _near_date(birth, rid.birth_date):
                flags.append("id-birthdate-typo")
            else:
                flags.append("id-birthdate-mismatch")
                continue
        if sex and sex != rid.sex:
            flags.append("id-sex-mismatch")
            continue
        if not birth:
            flags.append("birthdate-from-id")
        return rid.number, True, "", rid.birth_date, rid.sex
    return opaque, False, "" if opaque else suspect, birth, sex


def _divisions(text: str, after_city: bool) -> tuple[str, str, str]:
    """(county-level division, city, rest) of a Chinese address written divisions first.

    A county (区, 县, county-level 市, 旗) is only read after a province or city, in the text
    or in the address's own ``state``/``city``: "望京花园小区" alone is a street, not a county.
    """
    match = _DIVISIONS.match(text)
    if match is None or not (match["province"] or match["city"] or after_city):
        return "", "", text
    return match["county"] or "", match["city"] or "", text[match.end() :]


def _address(patient: dict, flags: list[str]) -> tuple[str, str, str]:
    """(street, locality, postcode) of the current home address."""
    address = _pick(_dicts(patient.get("address")), ("old", "billing"))
    if address is None:
        return "", "", ""
    lines = [fold(line) for line in _list(address.get("line")) if isinstance(line, str)]
    street = " ".join(line for line in lines if line) or fold(_str(address.get("text")))
    state, city, district = (fold(_str(address.get(k))) for k in ("state", "city", "district"))
    postcode = "".join(c for c in _str(address.get("postalCode")) if c.isalnum()).upper()
    if len(street) > MAX_ADDRESS or max(len(state), len(city), len(district)) > MAX_NAME:
        flags.append("address-too-long")
        return "", "", ""
    if street in _PLACEHOLDER_TEXT:
        flags.append("address-placeholder")
        street = ""
    county = ""
    if _HAN.search(street):
        for division in (state, city, district):
            if division and street.startswith(division):
                street = street[len(division) :]
        county, parsed_city, street = _divisions(street, bool(state or city))
        city = city or parsed_city
    locality = district or county or city
    if locality in _PLACEHOLDER_TEXT:
        locality = ""
    if len(postcode) > 10 or len(set(postcode)) <= 1:
        postcode = ""
    return street.strip(" ,，"), locality, postcode


def normalize(patient: object, *, id_systems: Mapping[str, str] = ID_SYSTEMS) -> Record:
    """The :class:`Record` of a FHIR R4 Patient (JSON). Never raises; see :attr:`Record.flags`."""
    if not isinstance(patient, dict):
        return Record(flags=("not-a-patient",))
    flags: list[str] = []
    family, given, family_roman, given_roman, han = _name(patient, flags)
    birth = _birth_date(patient.get("birthDate"), flags)
    gender = patient.get("gender")
    sex = gender if gender in ("male", "female") else ""
    national_id, checked, suspect, birth, sex = _national_id(patient, id_systems, birth, sex, flags)
    phones: list[str] = []
    for telecom in _dicts(patient.get("telecom")):
        value = _str(telecom.get("value"))
        if telecom.get("system", "phone") not in ("phone", "sms") or not value:
            continue
        phone = canonical_phone(value[:64])
        if phone and phone not in phones:
            phones.append(phone)
        elif not phone:
            flags.append("phone-unusable")
    street, locality, postcode = _address(patient, flags)
    record = Record(
        family=family,
        given=given,
        family_roman=family_roman,
        given_roman=given_roman,
        han=han,
        birth_date=birth,
        sex=sex,
        national_id=national_id,
        id_checked=checked,
        id_suspect=suspect,
        phones=tuple(phones[:3]),
        street=street,
        locality=locality,
        postcode=postcode,
    )
    if not record.identifying:
        flags.append("no-identifying-data")
    return replace(record, flags=tuple(flags)) if flags else record
