"""HTTP conventions of FHIR REST: content negotiation, ``Prefer``, ETags, bodies and
the response for an interaction's :class:`~hie.fhir.service.Result`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from hie import jsonio
from hie.fhir.errors import error
from hie.fhir.search.dates import to_http_date
from hie.fhir.validation import parse_json, small_int
from hie.store import Version

_INSTANT = "%Y-%m-%dT%H:%M:%S.%fZ"
FHIR_JSON = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"
_JSON_TYPES = {FHIR_JSON, "application/json", "application/json+fhir", "text/json"}
_FORMAT_ALIASES = {
    "json": FHIR_JSON,
    "application/json": "application/json",
    FHIR_JSON: FHIR_JSON,
    "application/json+fhir": FHIR_JSON,
    "text/json": "application/json",
}
_PREFER_VALUES = {
    "return": {"minimal", "representation", "OperationOutcome"},
    "handling": {"strict", "lenient"},
}


@dataclass(frozen=True, slots=True)
class Format:
    """How to render the response: media type and pretty-printing."""

    media_type: str = FHIR_JSON
    pretty: bool = False


def negotiate(request: Request) -> Format:
    """The response format from ``_format`` (which wins) or ``Accept``; 406 if only
    formats this server does not produce are acceptable."""
    params = request.query_params
    pretty = params.get("_pretty", "false").lower() == "true"
    fmt = params.get("_format")
    if fmt is not None:
        media = _FORMAT_ALIASES.get(fmt.split(";")[0].strip().lower())
        if media is None:
            raise error(406, "not-supported", f"_format {fmt!r} is not served; use json")
        return Format(media, pretty)
    accept = request.headers.get("accept")
    if not accept:
        return Format(FHIR_JSON, pretty)
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        q = _quality(part)
        if q <= 0:
            continue
        if media in ("application/fhir+json", "application/json+fhir"):
            return Format(FHIR_JSON, pretty)
        if media in ("application/json", "text/json"):
            return Format("application/json", pretty)
        if media in ("*/*", "application/*"):
            return Format(FHIR_JSON, pretty)
    raise error(
        406,
        "not-supported",
        f"None of the accepted types ({accept}) is served; use application/fhir+json",
    )


def _quality(part: str) -> float:
    for param in part.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def prefer(request: Request) -> dict[str, str]:
    """The ``Prefer`` header's known preferences; 400 for a value they do not take.
    Unknown preferences are ignored, as RFC 7240 requires."""
    out: dict[str, str] = {}
    for header in request.headers.getlist("prefer"):
        for token in header.split(","):
            name, _, value = token.strip().partition("=")
            name = name.strip()
            value = value.strip().strip('"')
            if name in _PREFER_VALUES:
                if value not in _PREFER_VALUES[name]:
                    allowed = ", ".join(sorted(_PREFER_VALUES[name]))
                    raise error(
                        400,
                        "invalid",
                        f"Prefer {name}={value!r} is not understood; use one of {allowed}",
                    )
                out[name] = value
    return out


def check_content_type(request: Request, allowed: set[str] = _JSON_TYPES) -> None:
    """415 unless the body's media type is one of ``allowed``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in allowed:
        raise error(
            415,
            "not-supported",
            f"Content-Type {ctype or '(none)'!r} is not accepted here; "
            f"send {' or '.join(sorted(allowed))}",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 beyond ``limit`` bytes (checked while streaming, so a
    lying or absent Content-Length cannot get past it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise error(413, "too-costly", f"The body exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise error(413, "too-costly", f"The body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_etag(value: str | None, header: str) -> int | None:
    """The version number in an ``If-Match``-style header (``W/"3"`` or ``"3"``)."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    version = small_int(text)
    if version is None:
        raise error(400, "invalid", f'{header} must be an ETag like W/"3", got {value!r}')
    return version


def not_modified(request: Request, version: Version) -> bool:
    """True when ``If-None-Match``/``If-Modified-Since`` say the client is current."""
    inm = request.headers.get("if-none-match")
    if inm is not None:
        tags = {t.strip().removeprefix("W/").strip('"') for t in inm.split(",")}
        return "*" in tags or str(version.version) in tags
    ims = request.headers.get("if-modified-since")
    if ims:
        try:
            since = parsedate_to_datetime(ims)
        except (TypeError, ValueError):
            return False
        modified = datetime.strptime(version.last_updated, _INSTANT).replace(tzinfo=UTC)
        return since.timestamp() >= int(modified.timestamp())
    return False


def version_headers(version: Version | None, base: str, location: bool) -> dict[str, str]:
    """``ETag``, ``Last-Modified`` and (for writes) ``Location`` of a version."""
    if version is None:
        return {}
    headers = {
        "ETag": f'W/"{version.version}"',
        "Last-Modified": to_http_date(version.last_updated),
    }
    if location:
        headers["Location"] = f"{base}/{version.type}/{version.id}/_history/{version.version}"
    return headers


def fhir_response(
    status: int, content: Any, fmt: Format, headers: dict[str, str] | None = None
) -> Response:
    """A FHIR JSON response from bytes (served as they are) or a JSON-able object."""
    if content is None:
        body = b""
    else:
        body = content if isinstance(content, bytes) else jsonio.dumps(content)
        if fmt.pretty:  # re-parse: embedded Fragments are not indented otherwise
            body = jsonio.dumps(jsonio.loads(body, trusted=True), pretty=True)
    media = f"{fmt.media_type}; charset=utf-8"
    return Response(body, status, headers=headers, media_type=media if body else None)


async def parameter_items(
    request: Request, value_keys: dict[str, tuple[str, ...]], op: str
) -> list[tuple[str, str]]:
    """The parameters of an operation's POSTed Parameters resource, as URL items:
    ``value_keys`` names each parameter the operation takes and its allowed value[x]
    (400 for any other, for a missing or repeated value, or a value of a wrong type); a
    ``valueReference`` gives its ``reference``."""
    check_content_type(request)
    body = parse_json(await read_body(request, request.app.state.settings.max_body_bytes))
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise error(400, "invalid", f"POST {op} takes a Parameters resource")
    items: list[tuple[str, str]] = []
    for part in body.get("parameter") or ():
        name = part.get("name") if isinstance(part, dict) else None
        if name not in value_keys:
            raise error(400, "not-supported", f"Unknown parameter {name!r} for {op}")
        values = [(k, part[k]) for k in value_keys[name] if k in part]
        if len(values) != 1 or len(part) != 2:
            allowed = " or ".join(value_keys[name])
            raise error(400, "invalid", f"Parameter {name} needs one value: {allowed}")
        kind, value = values[0]
        if kind == "valueBoolean":
            if not isinstance(value, bool):
                raise error(400, "invalid", f"Parameter {name}: {kind} must be a boolean")
            value = "true" if value else "false"
        elif kind.startswith("value") and kind[5:] in ("Integer", "PositiveInt", "UnsignedInt"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise error(400, "invalid", f"Parameter {name}: {kind} must be an integer")
            value = str(value)
        elif kind == "valueReference":
            value = value.get("reference") if isinstance(value, dict) else None
            if not isinstance(value, str):
                raise error(400, "invalid", f"Parameter {name}: {kind} needs a reference")
        elif not isinstance(value, str):
            raise error(400, "invalid", f"Parameter {name}: {kind} must be a string")
        items.append((name, value))
    return items
