"""How many cores this container may use, and how many wrapper workers that calls for.

`os.cpu_count()` counts the host's cores, which a container seldom gets all
of: it is bound by its CPU affinity (`docker --cpuset-cpus`, Kubernetes'
static CPU manager) and by its cgroup CPU quota (`docker --cpus`, Kubernetes
CPU limits), and the smaller of the two is what it can use.

One wrapper worker serves about 8,000 non-streamed requests or 5,700 streams
of 64 chunks a second on one core (README, Performance). On a GPU host the
engine needs cores of its own (its API server, the engine core's busy loop,
one process per GPU, media decoding), so the default (`WORKERS=auto`) gives
the wrapper a quarter of the cores: 1 worker up to 7 cores, then one more per
4 cores, at most `MAX_AUTO_WORKERS`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
CORES_PER_WORKER = 4
MAX_AUTO_WORKERS = 8


def available_cores(v2_max: Path = CGROUP_V2_MAX, v1_quota: Path = CGROUP_V1_QUOTA,
                    v1_period: Path = CGROUP_V1_PERIOD) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(v2_max, v1_quota, v1_period)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else max(1, cores)


def auto_workers(cores: int | None = None) -> int:
    """WORKERS=auto: a quarter of the available cores, at least 1, at most MAX_AUTO_WORKERS."""
    cores = available_cores() if cores is None else cores
    return max(1, min(MAX_AUTO_WORKERS, cores // CORES_PER_WORKER))


def _cgroup_quota(v2_max: Path, v1_quota: Path, v1_period: Path) -> float | None:
    """Cores allowed by the CPU quota, or None without one."""
    try:
        quota, _, period = v2_max.read_text().strip().partition(" ")
        if quota != "max":
            return int(quota) / int(period or "100000")
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(v1_quota.read_text())
        if quota_us > 0:
            return quota_us / int(v1_period.read_text())
    except (OSError, ValueError):
        pass
    return None
