"""The wrapper's application served by Granian instead of uvicorn: a candidate server, measured only.

Granian (Rust, hyper and tokio) is an ASGI server with a native HTTP core:
the parsing, the connection handling and the response writes that uvicorn
does in Python run in Rust. The wrapper cannot simply switch to it: its
uvicorn protocol (`app.serve.GuardedHttpProtocol`) bounds slow headers and
unread bodies and tells the application when a client hangs up, and its
`DrainingServer` drains on SIGTERM; Granian has neither hook. So the
benchmark measures what Granian would gain with the same application and
settings (every feature on, the JSON log line to stdout, wrapper-only mode
against ENGINE_URL), the application falling back to plain ASGI where the
uvicorn extension is absent (`app.request_progress`).

Run: `python -m bench.granian_wrapper` with the wrapper's environment (PORT, HOST, ENGINE_URL, ...).
One worker, one runtime thread, uvloop, HTTP/1.1: the same shape as one uvicorn worker.
"""

from __future__ import annotations

import gc
import sys

from granian import Granian
from granian.constants import HTTPModes, Interfaces, Loops
from starlette.types import ASGIApp

from app.config import ConfigError, load_settings
from app.main import create_app
from app.observability.logging import configure_logging, install_secret_redaction
from app.services import Services

TARGET = "bench.granian_wrapper:application"


def application() -> ASGIApp:
    """The factory Granian calls in its worker: the wrapper's app as `app.serve` builds it."""
    settings = load_settings()
    configure_logging(settings.LOG_FORMAT, settings.LOG_LEVEL)
    install_secret_redaction(settings.secret_values)
    app = create_app(Services.build(settings))
    gc.freeze()  # as app.serve does before serving
    return app


def server(host: str, port: int) -> Granian:
    return Granian(TARGET, address=host, port=port, interface=Interfaces.ASGI, factory=True, workers=1,
                   runtime_threads=1, loop=Loops.uvloop, http=HTTPModes.http1, websockets=False,
                   log_access=False, backlog=2048)


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"granian_wrapper: {error}", file=sys.stderr)
        return 2
    server(settings.HOST, settings.PORT).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
