"""How much memory a process may still take, and refusing work that needs more before allocating it.

A size typed wrong (``--batch 100000``, ``"d_model": 100000``) otherwise allocates until the
kernel kills the process, or the machine swaps to a standstill for everyone on it; under a
memory limit it ends in a traceback from deep inside torch. Estimates compared against this
figure are lower bounds of what the work needs, so nothing that fits is ever refused.
"""

from __future__ import annotations

import resource
from pathlib import Path

from bytemtp.errors import BytemtpError

GIB = 1 << 30


def available_memory(device: object = "cpu") -> int | None:
    """Bytes this process can still allocate on ``device`` (a torch.device or its name), or None
    where that is unknown. CPU: the least of the kernel's estimate of available memory, the room
    under the cgroup's limit (containers, Slurm) and the room under the address-space limit
    (``ulimit -v``); CUDA: the device's free memory."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    if kind != "cpu":
        return None
    known = [x for x in (_meminfo_available(), _cgroup_room(), _address_space_room()) if x is not None]
    return min(known) if known else None


def require_memory(need: int, what: str, device: object = "cpu", advice: str = "") -> None:
    """Refuse, in one line naming ``what``, work that needs at least ``need`` bytes when less is available."""
    have = available_memory(device)
    if have is not None and need > have:
        raise BytemtpError(f"{what} needs at least {need / GIB:,.1f} GiB of memory, and {have / GIB:,.1f} GiB "
                           f"is available{advice}")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Room under a cgroup v2 memory limit (the process's own cgroup), None without one."""
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("::")[-1]
        root = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _address_space_room() -> int | None:
    """Room under ``RLIMIT_AS``: the limit less the address space already mapped."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        status = Path("/proc/self/status").read_text()
        used = int(status.split("VmSize:")[1].split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return max(0, limit - used)
