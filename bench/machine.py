"""CPU accounting around each benchmark cell: who used which core, and how noisy the machine was.

A throughput figure means something only if we know what limited it. For each
cell we record how busy each core was, how much of a core the gateway under
test used (its whole process tree), and the steal time of the virtual machine.
A gateway near 100% of its core was the bottleneck; one well below it while
the client core is saturated means the client side limited the cell. CPU used
on the gateway core by anything other than the gateway is other load on the
machine: noise.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

GATEWAY_BOUND = 0.90  # share of a core above which the gateway is taken as the bottleneck
CLIENT_BOUND = 0.95  # busy share of the client core above which the client side limited the cell
STALLED = "stalled"


@dataclass(frozen=True, slots=True)
class CoreTimes:
    total: float
    idle: float  # idle + iowait
    steal: float


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    at: float
    cores: list[CoreTimes]
    gateway_s: float


def _process_seconds(processes: Iterable[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def snapshot(gateway: Iterable[psutil.Process]) -> CpuSnapshot:
    cores = [CoreTimes(sum(t), t.idle + t.iowait, t.steal) for t in psutil.cpu_times(percpu=True)]
    return CpuSnapshot(time.monotonic(), cores, _process_seconds(gateway))


def usage(before: CpuSnapshot, after: CpuSnapshot, gateway_core: int | None) -> dict[str, float]:
    """Busy share of each core, the VM's steal share, the gateway's share of one core, and other load."""
    wall = after.at - before.at
    out: dict[str, float] = {}
    steal = 0.0
    for index, (b, a) in enumerate(zip(before.cores, after.cores, strict=True)):
        total = a.total - b.total
        out[f"core{index}_busy"] = 0.0 if total <= 0 else max(0.0, 1.0 - (a.idle - b.idle) / total)
        steal += 0.0 if total <= 0 else (a.steal - b.steal) / total
    out["steal"] = steal / max(1, len(before.cores))
    # A process that starts or ends between the snapshots is missed; a gateway's tree is stable during a cell.
    out["gateway_cpu"] = max(0.0, (after.gateway_s - before.gateway_s) / wall) if wall > 0 else 0.0
    if gateway_core is not None:
        out["other_on_gateway_core"] = max(0.0, out[f"core{gateway_core}_busy"] - out["gateway_cpu"])
    return out


def bottleneck(cpu: dict[str, float], client_core: int, requests: int, errors: int) -> str:
    """'gateway', 'client', 'neither' (latency-bound, e.g. low concurrency or a slow upstream), or 'stalled'.

    'stalled': not one request ended, nor failed, in the whole window. That happens when the
    virtual machine is frozen for seconds; the cell measured nothing and is left out of the figures.
    """
    if requests == 0 and errors == 0:
        return STALLED
    if cpu["gateway_cpu"] >= GATEWAY_BOUND:
        return "gateway"
    if cpu.get(f"core{client_core}_busy", 0.0) >= CLIENT_BOUND:
        return "client"
    return "neither"


def describe() -> dict[str, object]:
    """Facts about the machine for the report."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()
