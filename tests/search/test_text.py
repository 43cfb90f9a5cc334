"""String folding and phonetic keys (hie.fhir.search.text), expectations worked by hand."""

import pytest

from hie.fhir.search.text import fold, index_phonetic, phonetic, query_phonetic


@pytest.mark.parametrize(
    ("raw", "folded"),
    [
        ("ＺＨＡＮＧ", "zhang"),  # full-width Latin
        ("（张三）１２３", "(张三)123"),  # full-width punctuation and digits
        ("张　三", "张 三"),  # ideographic space
        ("ｶﾞ", "ガ"),  # half-width katakana, voicing mark kept
        ("Éloïse  MÜLLER", "eloise muller"),
        ("Łukasz Ørsted", "lukasz orsted"),
        ("Straße", "strasse"),
        ("  José\t\nGarcía  ", "jose garcia"),
        ("張三", "张三"),
        ("鍾劉陳黃趙鄭蕭龔譚", "钟刘陈黄赵郑萧龚谭"),
        ("\uf900", "岂"),  # CJK compatibility ideograph: NFKC to 豈, then simplified
        ("张\u200b三", "张三"),  # zero-width space from copy and paste
        ("김민준", "김민준"),  # Hangul survives decomposition
        ("हिन्दी", "हिन्दी"),  # Indic vowel signs and virama are not accents
        ("𠮷野家", "𠮷野家"),  # outside the BMP
        ("", ""),
        (" \t\n", ""),
        ("Zhang San", "zhang san"),
    ],
)
def test_fold(raw, folded):
    assert fold(raw) == folded


def test_fold_traditional_query_finds_simplified_value():
    assert fold("张三").startswith(fold("張"))
    assert fold("張三豐").startswith(fold("张三"))


def test_fold_is_idempotent_and_prefix_stable():
    chars = [chr(c) for c in [*range(0x20, 0xD800), *range(0xE000, 0x10000)]]
    assert [c for c in chars if fold(fold(c)) != fold(c)] == []
    name = "歐陽娜娜 Éloïse ＺＨＡＮＧ"
    for end in range(len(name)):
        assert fold(name).startswith(fold(name[:end]).rstrip())


def test_fold_long_string():
    assert fold("張" * 100_000) == "张" * 100_000
    assert fold("a  " * 100_000) == " ".join(["a"] * 100_000)


@pytest.mark.parametrize(
    ("family", "reading"),
    [
        ("单", "shan"),
        ("單", "shan"),
        ("曾", "zeng"),
        ("区", "ou"),
        ("仇", "qiu"),
        ("朴", "piao"),
        ("解", "xie"),
        ("查", "zha"),
        ("尉迟", "yuchi"),
        ("万俟", "moqi"),
        ("长孙", "zhangsun"),
        ("欧阳", "ouyang"),
        ("張", "zhang"),
        ("吕", "lv"),
        ("Smith", "smith"),
    ],
)
def test_surname_readings(family, reading):
    assert phonetic(family, surname=True) == reading


def test_phonetic_everyday_readings():
    assert phonetic("张三") == "zhangsan"
    assert phonetic("單") == "dan"  # not a surname here
    assert phonetic("Zhāng Sān 1") == "zhangsan"  # tone marks and digits dropped
    assert phonetic("") == ""


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ({"family": "张", "given": ["三"]}, ["zhang", "san", "zhangsan", "sanzhang"]),
        ({"family": "張", "given": ["三"]}, ["zhang", "san", "zhangsan", "sanzhang"]),
        ({"text": "单田芳"}, ["shan", "tianfang", "shantianfang", "tianfangshan"]),
        ({"family": "單", "given": ["田芳"]}, ["shan", "tianfang", "shantianfang", "tianfangshan"]),
        ({"text": "尉迟恭"}, ["yuchi", "gong", "yuchigong", "gongyuchi"]),
        ({"text": "欧阳 娜娜"}, ["ouyang", "nana", "ouyangnana", "nanaouyang"]),
        (
            {"family": "乐", "given": ["嘉"]},  # two surname readings: both indexed
            ["yue", "le", "jia", "yuejia", "jiayue", "lejia", "jiale"],
        ),
        ({"text": "买买提·艾力"}, ["maimaiti", "aili", "maimaitiaili", "ailimaimaiti"]),
        ({"text": "王Anna"}, ["wang", "anna", "wanganna", "annawang"]),
        ({"family": "𠮷", "given": ["野"]}, ["𠮷", "ye", "𠮷ye", "ye𠮷"]),
        (
            {"family": "Smith", "given": ["John"]},
            ["smith", "john", "smithjohn", "johnsmith", "~SM0", "~JN", "~SM0JN", "~JNSM0"],
        ),
        (
            {"text": "John Smith"},  # Latin text: family last
            ["smith", "john", "smithjohn", "johnsmith", "~SM0", "~JN", "~SM0JN", "~JNSM0"],
        ),
        (
            {"family": "Lü", "given": ["Bu"]},
            ["lv", "bu", "lvbu", "bulv", "~LF", "~B", "~LFB", "~BLF"],
        ),
        ({}, []),
        ({"family": "", "given": [], "text": ""}, []),
        ({"family": 5, "given": [None, 7], "text": ["x"]}, []),
    ],
)
def test_index_phonetic(name, keys):
    assert index_phonetic(name) == keys


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("zhang", "zhang"),
        ("Zhang San", "zhangsan"),
        ("zhangs", "zhangs"),  # pinyin cut short is still pinyin
        ("ZHANG", "zhang"),
        ("ｚｈａｎｇ", "zhang"),
        ("zhāng", "zhang"),
        ("张", "zhang"),
        ("張三", "zhangsan"),
        ("单", "shan"),  # a Han query starts with a surname
        ("单田芳", "shantianfang"),
        ("lü", "lv"),
        ("Lyu", "lv"),  # passport spelling
        ("lv", "lv"),
        ("Smyth", "~SM0"),
        ("Smith", "~SM0"),
        ("Mike", "mike"),  # spells mi+ke: matched as written
        ("w", "w"),  # no Metaphone code: matched as written
        ("𠮷野", "𠮷ye"),
    ],
)
def test_query_phonetic(value, key):
    assert query_phonetic(value) == key


@pytest.mark.parametrize("value", ["", "   ", "123", "--"])
def test_query_phonetic_without_letters(value):
    with pytest.raises(ValueError):
        query_phonetic(value)


def finds(value: str, name: dict) -> bool:
    key = query_phonetic(value)
    return any(k.startswith(key) for k in index_phonetic(name))


ZHANG_SAN = {"family": "张", "given": ["三"]}
ZHANG_SAN_TRADITIONAL = {"text": "張三"}
SHAN_TIANFANG = {"family": "单", "given": ["田芳"]}
SMITH = {"family": "Smith", "given": ["John"]}
ZHANG_SAN_LATIN = {"text": "Zhang San"}


@pytest.mark.parametrize(
    ("value", "name", "found"),
    [
        ("zhang", ZHANG_SAN, True),
        ("zhang", ZHANG_SAN_TRADITIONAL, True),
        ("zhangsan", ZHANG_SAN, True),
        ("sanzhang", ZHANG_SAN, True),
        ("zhangs", ZHANG_SAN, True),
        ("san", ZHANG_SAN, True),
        ("張", ZHANG_SAN, True),
        ("张", ZHANG_SAN_LATIN, True),  # Han query, record typed in pinyin
        ("zhang", ZHANG_SAN_LATIN, True),
        ("li", ZHANG_SAN, False),
        ("zheng", ZHANG_SAN, False),
        ("shan", SHAN_TIANFANG, True),
        ("dan", SHAN_TIANFANG, False),
        ("單田芳", SHAN_TIANFANG, True),
        ("Smyth", SMITH, True),
        ("Smith", SMITH, True),
        ("John Smith", SMITH, True),
        ("Smyth", ZHANG_SAN, False),
        ("Brown", SMITH, False),
        ("le", {"text": "乐嘉"}, True),
        ("yue", {"text": "乐嘉"}, True),
    ],
)
def test_phonetic_matching(value, name, found):
    assert finds(value, name) is found


def test_phonetic_long_name():
    keys = index_phonetic({"text": "张" + "三" * 1000})
    assert keys[:2] == ["zhang", "san" * 1000]
