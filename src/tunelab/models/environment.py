"""What ``tunelab env`` reports: the installed packages, the device training would use and its precision."""

from __future__ import annotations

import platform

import torch

from tunelab.models.precision import cpu_has_fast_bf16, resolve_device, resolve_precision
from tunelab.track.provenance import package_versions


def environment_report() -> list[tuple[str, str]]:
    """``(name, value)`` rows: each package's version, then the device and the precision ``auto`` picks."""
    rows = [(name, version or "not installed") for name, version in package_versions().items()]
    device = resolve_device("auto")
    if device.type == "cuda":
        detail = torch.cuda.get_device_name(device)
    else:
        detail = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
                 f"native bf16: {'yes' if cpu_has_fast_bf16() else 'no'}"
    rows.append(("device", f"{device} ({detail})"))
    rows.append(("precision", f"{resolve_precision('auto', device)} (what train.precision: auto picks)"))
    return rows
