"""DeepEP V1's ``deep_ep.utils``: ``EventOverlap`` and ``check_nvlink_connections``."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from .buffer import EventOverlap

__all__ = ["EventOverlap", "check_nvlink_connections"]


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """Raise ``RuntimeError`` unless every pair of this host's GPUs in ``group`` can reach
    each other peer to peer (what the intranode kernels' CUDA IPC mappings need).

    Collective over ``group``. DeepEP asks NVML about NVLink on PCIe GPUs; peer access is the
    property the kernels rely on, so that is what is checked here. Groups of CPU (gloo-only)
    processes have nothing to check.
    """
    device = torch.cuda.current_device() if torch.cuda.is_available() else -1
    entries: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(entries, (socket.gethostname(), device), group=group)
    host = socket.gethostname()
    devices = sorted({d for h, d in entries if h == host and d >= 0})
    for a in devices:
        for b in devices:
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                raise RuntimeError(
                    f"check_nvlink_connections: cuda:{a} cannot access cuda:{b} peer to peer on "
                    f"{host}; the intranode kernels need peer access between the group's GPUs"
                )
