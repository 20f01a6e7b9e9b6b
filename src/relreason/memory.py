"""How much memory this process may still take: the kernel's estimate, under the tightest cgroup limit (v2 or v1)
of its container or batch job."""

from __future__ import annotations

from pathlib import Path


def available_memory_bytes(
    meminfo: str = "/proc/meminfo", cgroup_root: str = "/sys/fs/cgroup", own_cgroup: str = "/proc/self/cgroup"
) -> int | None:
    """Memory the kernel reports as available to new allocations (Linux), or None where unknown; under a
    memory limit (a container, a batch job; cgroup v2 or v1), at most what the tightest limit on this process's
    cgroup and its ancestors leaves, counting reclaimable file cache as free."""
    available = None
    try:
        with open(meminfo) as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    v2 = [(folder, "memory.max", "memory.current", "inactive_file") for folder in _cgroup_chain(cgroup_root, own_cgroup)]
    v1 = [(folder, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
          for folder in _cgroup_chain(cgroup_root, own_cgroup, controller="memory")]
    for folder, limit_name, usage_name, inactive_name in v2 + v1:
        try:
            limit = (folder / limit_name).read_text().strip()
            if limit == "max" or int(limit) >= _V1_UNLIMITED:
                continue
            used = int((folder / usage_name).read_text()) - _stat(folder, inactive_name)
            left = max(int(limit) - used, 0)
        except (OSError, ValueError):
            continue
        available = left if available is None else min(available, left)
    return available


# cgroup v1 writes "no limit" as the largest page-aligned 64-bit number.
_V1_UNLIMITED = 2**62


def _cgroup_chain(cgroup_root: str, own_cgroup: str, controller: str | None = None) -> list[Path]:
    """This process's cgroup folder and its ancestors up to the root (the root alone when unknown): cgroup v2's
    (``controller`` None), or the v1 hierarchy of ``controller`` (mounted at ``cgroup_root/controller``)."""
    root = Path(cgroup_root) if controller is None else Path(cgroup_root) / controller
    relative = Path()
    try:
        for line in Path(own_cgroup).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controller is None and controllers == "") or controller in controllers.split(","):
                relative = Path(path.strip().lstrip("/"))
                break
    except (OSError, ValueError):
        pass
    chain = [root / relative]
    while relative != relative.parent:
        relative = relative.parent
        chain.append(root / relative)
    return chain


def _stat(folder: Path, key: str) -> int:
    """One count of ``folder/memory.stat`` (0 where unknown)."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
