"""Every route the wrapper answers, in one fixed table.

The table is the front door's map (`app.frontdoor`): for each path it says
who may call it, whether it is relayed to the engine or answered by the
wrapper, whether it takes an engine slot, what kind of body it carries, and
the `route` label its metrics use. Anything not in the table is answered 404
by the wrapper itself and counted under one label, `other`, so a client that
loops over random paths can neither reach the engine's other routes (admin,
profiling, weight updates) nor grow the metrics.

Engine routes are those the pinned vLLM (0.32) serves for inference; the
label is the path with parameters as `{id}`. A trailing slash is ignored, so
`/v1/models/` is served as `/v1/models` rather than answered with the
engine's redirect to its internal address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Access = Literal["public", "key", "operator"]
Handler = Literal["engine", "wrapper", "unknown"]
Body = Literal["none", "json", "multipart"]

OTHER = "other"
GET = frozenset({"GET", "HEAD"})
POST = frozenset({"POST"})


@dataclass(frozen=True, slots=True)
class Route:
    """What the front door needs to know about one route.

    `access`: public (probes), key (API_KEY when set), operator (the key unless
    PUBLIC_METRICS). `admitted`: the request takes an engine slot (admission,
    drain). `body`: what a POST carries; `none` means no body is read.
    """

    label: str
    methods: frozenset[str]
    handler: Handler
    access: Access = "key"
    admitted: bool = False
    body: Body = "none"

    @property
    def relayed(self) -> bool:
        return self.handler == "engine"


def _engine_post(label: str, body: Body = "json") -> Route:
    return Route(label, POST, "engine", admitted=True, body=body)


def _engine_get(label: str) -> Route:
    return Route(label, GET, "engine", admitted=True)


ENGINE_ROUTES: tuple[Route, ...] = (
    _engine_post("/v1/chat/completions"),
    _engine_post("/v1/chat/completions/render"),
    _engine_post("/v1/chat/completions/batch"),
    _engine_post("/v1/completions"),
    _engine_post("/v1/completions/render"),
    _engine_post("/v1/responses"),
    _engine_get("/v1/responses/{id}"),
    Route("/v1/responses/{id}/cancel", POST, "engine", admitted=True),
    _engine_post("/v1/messages"),
    _engine_post("/v1/messages/count_tokens"),
    _engine_get("/v1/models"),
    _engine_post("/v1/embeddings"),
    _engine_post("/pooling"),
    _engine_post("/classify"),
    _engine_post("/score"),
    _engine_post("/v1/score"),
    _engine_post("/rerank"),
    _engine_post("/v1/rerank"),
    _engine_post("/v2/rerank"),
    _engine_post("/tokenize"),
    _engine_post("/detokenize"),
    _engine_post("/v1/audio/transcriptions", body="multipart"),
    _engine_post("/v1/audio/translations", body="multipart"),
)

PROBE_LABELS = frozenset({"/ping", "/health", "/health/live", "/health/ready", "/metrics"})

WRAPPER_ROUTES: tuple[Route, ...] = (
    Route("/ping", GET, "wrapper", access="public"),
    Route("/health", GET, "wrapper", access="public"),
    Route("/health/live", GET, "wrapper", access="public"),
    Route("/health/ready", GET, "wrapper", access="public"),
    Route("/metrics", GET, "wrapper", access="operator"),
    Route("/info", GET, "wrapper", access="operator"),
    Route("/openapi.json", GET, "wrapper"),
    Route("/generate", POST, "wrapper", admitted=True, body="json"),
    Route("/conversations", GET, "wrapper"),
    Route("/conversations/{id}", GET | {"DELETE"}, "wrapper"),
    # With MODELS: every model with its state, and loading or unloading one (the API key, always).
    Route("/admin/models", GET, "wrapper"),
    Route("/admin/models/load", POST, "wrapper", body="json"),
    Route("/admin/models/unload", POST, "wrapper", body="json"),
)

UNKNOWN = Route(OTHER, frozenset(), "unknown")


class RouteTable:
    """Finds the `Route` of a request path: a dict lookup, plus one segment of parameter."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._exact: dict[str, Route] = {}
        # (prefix, suffix) around one "{id}" segment -> route
        self._parametrized: list[tuple[str, str, Route]] = []
        for route in routes:
            prefix, marker, suffix = route.label.partition("{id}")
            if marker:
                self._parametrized.append((prefix, suffix, route))
            else:
                self._exact[route.label] = route

    def match(self, path: str) -> Route:
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        route = self._exact.get(path)
        if route is not None:
            return route
        for prefix, suffix, candidate in self._parametrized:
            if path.startswith(prefix) and path.endswith(suffix):
                middle = path[len(prefix) : len(path) - len(suffix)]
                if middle and "/" not in middle:
                    return candidate
        return UNKNOWN

    def add_alias(self, path: str, route: Route) -> None:
        """Serve `route` under another path too (e.g. HEALTH_CHECK_PATH for /ping)."""
        self._exact[path] = route


def canonical_path(path: str) -> str:
    """The path forwarded to the engine: without a trailing slash."""
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


def build_route_table() -> RouteTable:
    return RouteTable(ENGINE_ROUTES + WRAPPER_ROUTES)
