"""The bounded pool every piece of media work runs in, and the fetch caps.

Decoding an image, probing a video or base64-encoding a fetched file costs
CPU and memory in the wrapper process. Run on the default executor, a flood
of media requests could occupy as many threads as the loop's default pool
has (cores + 4) and the memory of as many decoded images at once, starving
the event loop and the engine on the same machine. So:

- Media work runs on one module-level pool of MEDIA_WORKERS threads: half
  the cores this process may use, at least 1, at most 8 (1 on a 2-core
  machine). The rest of the CPU stays with the event loop and the engine.
  Peak decode memory is bounded by MEDIA_WORKERS times the largest decode
  (MAX_IMAGE_PIXELS x 4 bytes: 160 MB at the default 40 M pixels). Work
  waits in the pool's queue; a request that ends (refused, client gone)
  drops its queued work.
- One request fetches at most FETCHES_PER_REQUEST URLs at a time (4).
- The fetcher's connection pool opens at most FETCH_CONNECTIONS_PER_HOST
  connections to one host (4) and FETCH_CONNECTIONS in all (64), so one
  client's slow media host holds a few connections, never all of them; a
  fetch waiting for a connection still counts against its
  MEDIA_FETCH_TIMEOUT_S.

With WORKERS=N wrapper processes, each process has its own pool and caps.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

FETCHES_PER_REQUEST = 4
FETCH_CONNECTIONS_PER_HOST = 4
FETCH_CONNECTIONS = 64


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


MEDIA_WORKERS = max(1, min(8, _usable_cores() // 2))
_pool = ThreadPoolExecutor(max_workers=MEDIA_WORKERS, thread_name_prefix="media")


async def run_blocking(function: Callable[..., T], *args: object) -> T:
    """Run `function(*args)` on the media pool and wait for its result."""
    return await asyncio.get_running_loop().run_in_executor(_pool, function, *args)
