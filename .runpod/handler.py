"""The RunPod Hub asks every listed repository for a `handler.py`: this image's.

A queue-based RunPod worker runs a handler function per job. This image is a
load-balancing worker (`"endpointType": "LB"` in hub.json): RunPod sends HTTP
requests straight to its server, which the container's entrypoint starts
(`scripts/start.sh`, then `app/lifecycle/supervisor.py`). This file starts the
same server from a checkout of the repository: `python .runpod/handler.py`.
"""

import os
import sys
from pathlib import Path

START = Path(__file__).resolve().parents[1] / "scripts" / "start.sh"

if __name__ == "__main__":
    os.environ.setdefault("PYTHON", sys.executable)
    os.execv(START, [str(START), *sys.argv[1:]])
