"""Fixtures of the consent tests: ``build(consent_default=..., consents=...)`` starts a
server on the test's store (sqlite or mongomock) and writes :mod:`tests.consent.world`."""

from __future__ import annotations

import itertools
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient

from hie.access import consents
from hie.app import create_app
from hie.config import Settings
from hie.store.query import WrittenAfter
from tests.conftest import make_store
from tests.consent.world import World


@pytest.fixture(params=["recent", "settled"])
def settle(request, monkeypatch) -> str:
    """Every resource of the test counts as written after the callers' withheld sets,
    so the store decides it by the consent formula (as it does for a resource written
    since its set was computed), or the sets decide all but what was written since."""
    if request.param == "recent":
        monkeypatch.setattr(consents, "WrittenAfter", lambda seq: WrittenAfter(0))
    return request.param


@pytest.fixture
def build(store_kind, settle, tmp_path):
    stack = ExitStack()
    counter = itertools.count()

    def _build(consent_default: str = "opt-out", consents=(), **settings) -> World:
        data_dir = tmp_path / f"world{next(counter)}"
        data_dir.mkdir()
        config = Settings(
            data_dir=data_dir,
            max_body_bytes=2 * 1024 * 1024,
            consent_default=consent_default,
            **settings,
        )
        app = create_app(config, make_store(store_kind, data_dir))
        http = stack.enter_context(TestClient(app, base_url="http://hie.test"))
        world = World(http, app).build()
        for spec in consents:
            world.consent(spec)
        return world

    with stack:
        yield _build


@pytest.fixture
def world(build) -> World:
    """The world under the default policy (opt-out), no Consent yet."""
    return build()
