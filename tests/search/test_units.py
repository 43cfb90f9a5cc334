"""UCUM canonical forms and search-number precision (hie.fhir.search.units), by hand."""

import random
from decimal import Decimal as D

import pytest

from hie.fhir.search.units import canonical, precision_range


def same(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether two (value, code) quantities have the same canonical form."""
    return canonical(D(a[0]), a[1]) == canonical(D(b[0]), b[1]) is not None


@pytest.mark.parametrize(
    ("value", "code", "expected"),
    [
        ("5.5", "mmol/L", ("5.5", "m-3.mol")),  # 5.5e-3 mol / 1e-3 m3
        ("5500", "umol/L", ("5.5", "m-3.mol")),
        ("1", "g/L", ("1000", "g.m-3")),
        ("100", "mg/dL", ("1000", "g.m-3")),  # 0.1 g / 1e-4 m3
        ("120", "mm[Hg]", ("15998640", "g.m-1.s-2")),  # 120 x 133.3220 Pa, Pa = 1000 g/(m.s2)
        ("6.5", "10*9/L", ("6.5e12", "m-3")),
        ("4.5", "10*12/L", ("4.5e15", "m-3")),
        ("45", "%", ("0.45", "1")),
        ("1", "[lb_av]", ("453.59237", "g")),  # 7000 grains of 64.79891 mg
        ("170", "cm", ("1.7", "m")),
        ("1", "[in_i]", ("0.0254", "m")),
        ("72", "/min", ("1.2", "s-1")),
        ("1", "h", ("3600", "s")),
        ("2", "d", ("172800", "s")),
        ("1", "wk", ("604800", "s")),
        ("1", "mo", ("2629800", "s")),  # a Julian year (365.25 d) / 12
        ("1", "a", ("31557600", "s")),
        ("5", "mL", ("0.000005", "m3")),
        ("1.5", "L", ("0.0015", "m3")),
        ("140", "meq/L", ("140", "m-3.mol")),
        ("22.5", "kg/m2", ("22500", "g.m-2")),
        ("90", "fL", ("9e-17", "m3")),
        ("30", "pg", ("3e-11", "g")),
        ("60", "U/L", ("0.001", "m-3.mol.s-1")),  # 60 umol/min per L
        ("10", "[IU]/L", ("10000", "[iU].m-3")),
        ("2", "[arb'U]", ("2", "[arb'U]")),
        ("37", "Cel", ("310.15", "K")),
        ("98.6", "[degF]", ("310.15", "K")),  # (98.6 + 459.67) x 5/9
        ("-40", "[degF]", ("233.15", "K")),
        ("90", "mL/min/{1.73_m2}", ("0.0000015", "m3.s-1")),
        ("5", "{cells}/uL", ("5e9", "m-3")),
        ("3", "/100{WBCs}", ("0.03", "1")),
        ("1", "kg/m/s", ("1000", "g.m-1.s-1")),  # left to right: (kg/m)/s
        ("1", "/kg.h", ("3.6", "g-1.s")),  # a leading solidus inverts only kg
        ("1", "kg/(m.s2)", ("1000", "g.m-1.s-2")),
        ("2", "10*3", ("2000", "1")),
        ("1", "10*-3", ("0.001", "1")),
        ("1", "4.[pi]", ("12.56637061435917295385057353311801", "1")),
    ],
)
def test_canonical(value, code, expected):
    assert canonical(D(value), code) == (D(expected[0]), expected[1])


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("5.5", "mmol/L"), ("5500", "umol/L")),
        (("1", "g/L"), ("100", "mg/dL")),
        (("0.5", "g/L"), ("50", "mg/dL")),
        (("150", "g/L"), ("15", "g/dL")),  # haemoglobin
        (("6.5", "10*9/L"), ("6.5", "10*3/uL")),
        (("1", "[lb_av]"), ("0.45359237", "kg")),
        (("1", "[in_i]"), ("2.54", "cm")),
        (("72", "/min"), ("4320", "/h")),
        (("1", "a"), ("12", "mo")),
        (("1", "a"), ("365.25", "d")),
        (("1000", "mL"), ("1", "L")),
        (("140", "meq/L"), ("140", "mmol/L")),
        (("10", "[IU]/L"), ("10", "[iU]/L")),
        (("10", "m[IU]/mL"), ("10", "[IU]/L")),
        (("32", "[degF]"), ("0", "Cel")),
        (("1", "g{creat}"), ("1", "g")),
        (("120", "mm[Hg]"), ("15.99864", "kPa")),
    ],
)
def test_commensurable(a, b):
    assert same(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("mmol/L", "mg/dL"),  # molar vs mass: needs a molar mass (recognition module)
        ("mmol/L", "10*9/L"),  # mol is a base unit, not Avogadro's count
        ("U/L", "[IU]/L"),
        ("[IU]/L", "10*9/L"),
        ("%", "g/dL"),
        ("kg", "kg/m2"),
    ],
)
def test_not_commensurable(a, b):
    assert canonical(D(1), a)[1] != canonical(D(1), b)[1]


@pytest.mark.parametrize(
    "code",
    [
        "foo",
        "mEq/L",  # case-sensitive UCUM: meq/L
        "µg",  # UCUM is ASCII: ug
        "mg/",
        "/",
        "//s",
        "mg//dL",
        "(m",
        "m)",
        "()",
        "m[",
        "[in_i",
        "{",
        "}",
        "m{x",
        "m{a b}",
        "{a}{b}",
        "(m)2",
        "2m",
        "mg dL",
        " mg",
        "mg ",
        "",
        "\x00",
        "m" * 201,
        "10*999999999",
        "/0",
        "0.mg",
        "kcal/[Hg]",
        "[pH]",
        "dB",
        "B[SPL]",
        "Cel/h",
        "mCel",
        "[degF]2",
        "Torr",  # in UCUM's example list, not in its table
        "kCel",
        "k10*",  # 10* is not metric
        "da[in_i]",
    ],
)
def test_invalid_or_special_is_none(code):
    assert canonical(D(1), code) is None


@pytest.mark.parametrize("value", [D("NaN"), D("Infinity"), D("-Infinity"), D("1e999999"), 1, "1"])
def test_bad_values_are_none(value):
    assert canonical(value, "kg") is None


def test_bad_codes_never_raise():
    assert canonical(D(1), None) is None
    assert canonical(D(1), "(" * 99 + "m" + ")" * 99) == (D(1), "m")
    rng = random.Random(20240601)
    alphabet = "mgLs/.()[]{}*^+-0123456789%'_uUkKdcahI"
    for _ in range(5000):
        code = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        result = canonical(D("1.5"), code)
        assert result is None or (result[0].is_finite() and isinstance(result[1], str))


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("100", "99.5", "100.5"),
        ("100.00", "99.995", "100.005"),
        ("0.1", "0.05", "0.15"),
        ("1e2", "50", "150"),  # one significant figure
        ("1.0e2", "95", "105"),
        ("1E-3", "0.0005", "0.0015"),
        ("-100", "-100.5", "-99.5"),
        ("0", "-0.5", "0.5"),
        ("5.5", "5.45", "5.55"),
        (
            "123456789012345678901234567890123456789",
            "123456789012345678901234567890123456788.5",
            "123456789012345678901234567890123456789.5",
        ),
        (D("100.0"), "99.95", "100.05"),
        (D(7), "6.5", "7.5"),
    ],
)
def test_precision_range(value, low, high):
    assert precision_range(value) == (D(low), D(high))


@pytest.mark.parametrize(
    "value", ["", "abc", "1,5", " 1", "1.", ".5", "1e", "NaN", "Infinity", "١٠٠", D("NaN"), 5]
)
def test_precision_range_rejects(value):
    with pytest.raises(ValueError):
        precision_range(value)


def test_quantity_search_across_units():
    """value-quantity=5.5|http://unitsofmeasure.org|mmol/L against a value in umol/L."""
    low, high = precision_range("5.5")
    low, unit = canonical(low, "mmol/L")
    high, _ = canonical(high, "mmol/L")
    stored, stored_unit = canonical(D("5500"), "umol/L")
    assert stored_unit == unit and low <= stored < high
    outside, _ = canonical(D("5560"), "umol/L")
    assert not low <= outside < high
