"""The route table: what is relayed, who may call it, and which label its metrics get."""

from __future__ import annotations

import pytest

from app.config import ConfigError, load_settings
from app.media import MEDIA_ROUTES
from app.routes import ENGINE_ROUTES, OTHER, WRAPPER_ROUTES, build_route_table

TABLE = build_route_table()


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions/", "/v1/chat/completions"),
        ("/v1/models/", "/v1/models"),
        ("/v1/responses/resp_123", "/v1/responses/{id}"),
        ("/v1/responses/resp_123/cancel", "/v1/responses/{id}/cancel"),
        ("/conversations/abc", "/conversations/{id}"),
        ("/v1/responses//cancel", OTHER),
        ("/v1/responses/a/b", OTHER),
        ("/conversations/a/b", OTHER),
        ("/v1/anything-else", OTHER),
        ("/collective_rpc", OTHER),
        ("/", OTHER),
        ("", OTHER),
    ],
)
def test_paths_map_to_a_fixed_set_of_labels(path: str, label: str) -> None:
    assert TABLE.match(path).label == label


def test_every_json_engine_route_has_its_media_checked() -> None:
    """A relayed JSON body goes through the media walker of its route; none is forwarded unchecked."""
    json_posts = {route.label for route in ENGINE_ROUTES if route.body == "json"}
    assert json_posts <= MEDIA_ROUTES, json_posts - MEDIA_ROUTES


def test_only_probes_are_public_and_engine_work_takes_a_slot() -> None:
    public = {route.label for route in ENGINE_ROUTES + WRAPPER_ROUTES if route.access == "public"}
    assert public == {"/ping", "/health", "/health/live", "/health/ready"}
    assert all(route.admitted for route in ENGINE_ROUTES)
    assert {route.label for route in WRAPPER_ROUTES if route.admitted} == {"/generate"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [("healthz", "write a path"), ("/health", "already a route"), ("/v1/models", "already a route"),
     ("/x?y=1", "write a path")],
)
def test_a_health_check_path_that_cannot_work_fails_at_start(value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"HEALTH_CHECK_PATH": value})
    assert str(raised.value).startswith("Invalid setting HEALTH_CHECK_PATH") and reason in str(raised.value)
