"""What a benchmark ran on: the machine description every bench JSON result carries.

Light on purpose (torch and the embedding model module only), so a benchmark that runs where
the project's full environment is not installed (bench_embed_gpu on a GPU machine) can use it.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

from research_pipeline.lib.embed.model import available_cores, native_bf16


def machine(device: str) -> dict[str, Any]:
    """What the figures were measured on: CPU model and flags, cores, memory, load, library versions."""
    import torch

    cpu_model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu_model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    mem = 0
    try:
        meminfo = Path("/proc/meminfo").read_text()
        mem = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    return {
        "cpu_model": cpu_model,
        "arch": platform.machine(),
        "cores": available_cores(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem,
        "cpu_bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16")),
        "native_bf16": native_bf16(device),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
