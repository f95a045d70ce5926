"""What NVML says about the machine's GPUs: memory for /metrics, name and count for /info.

The same image runs on GPU hosts and on CPUs. `pynvml` (package
`nvidia-ml-py`) loads the NVIDIA driver's NVML library; where there is no
driver or no GPU, every function here answers "no GPU" instead of failing, so
/metrics simply has no GPU series and /info says `gpu: null`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

try:
    import pynvml
except ImportError:  # the CPU image may be built without nvidia-ml-py
    pynvml = None

logger = logging.getLogger(__name__)

# None: not tried yet; then True/False for the life of the process.
_nvml_ready: bool | None = None


@dataclass(frozen=True, slots=True)
class GpuMemory:
    index: int
    used_bytes: int
    total_bytes: int


def _nvml_available() -> bool:
    """Load NVML once; a machine without a driver stays without one."""
    global _nvml_ready
    if _nvml_ready is None:
        if pynvml is None:
            _nvml_ready = False
        else:
            try:
                pynvml.nvmlInit()
                _nvml_ready = True
            except pynvml.NVMLError as exc:
                logger.debug("NVML not available, no GPU metrics: %s", exc)
                _nvml_ready = False
    return _nvml_ready


def gpu_info() -> dict[str, object] | None:
    """Name of the first GPU and the number of GPUs, or None without a GPU."""
    if not _nvml_available():
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    except pynvml.NVMLError as exc:
        logger.warning("NVML could not describe the GPUs: %s", exc)
        return None
    # Older NVML bindings return bytes.
    return {"name": name.decode() if isinstance(name, bytes) else name, "count": count}


def gpu_memory() -> list[GpuMemory]:
    """Used and total memory of every GPU; empty without a GPU."""
    if not _nvml_available():
        return []
    try:
        readings = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            memory = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            readings.append(GpuMemory(index, int(memory.used), int(memory.total)))
        return readings
    except pynvml.NVMLError as exc:
        logger.warning("NVML could not read GPU memory: %s", exc)
        return []
