"""One line describing the machine a benchmark ran on, for its table."""

from __future__ import annotations

import platform

import torch


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(
            line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line
        )
        name += ", AMX" if " amx_tile" in info else ", no AMX"
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"
