"""FHIR JSON in and out, keeping decimals exactly as written.

FHIR decimals carry their precision (``1.00`` is not ``1.0``; ``1.0E-245`` stays in
exponent form), so a stored resource must not pass through binary floats. Non-integer
numbers are parsed as :class:`decimal.Decimal` and serialised back from their text;
everything else goes through orjson.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


def loads(data: bytes, *, trusted: bool = False) -> Any:
    """Parse JSON bytes, with non-integer numbers as ``Decimal``.

    Untrusted input (a request body) is first checked by orjson for syntax, UTF-8,
    lone surrogates and nesting depth (raising ``orjson.JSONDecodeError``); bytes this
    server wrote itself (``trusted``) skip that. The stdlib decoder then keeps decimal
    text exactly.
    """
    if not trusted:
        orjson.loads(data)
    return _decoder.decode(data.decode("utf-8"))


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode())
    to_decimal = getattr(value, "to_decimal", None)  # bson.Decimal128 (MongoStore)
    if to_decimal is not None:
        return orjson.Fragment(str(to_decimal()).encode())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any, *, pretty: bool = False) -> bytes:
    """Serialise to JSON bytes; decimals are written as the text they were parsed from."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_INDENT_2 if pretty else 0)
