"""What every benchmark records about the machine its figures were measured on."""

from __future__ import annotations

import subprocess


def cpu_model() -> str:
    """The CPU's model name (``lscpu``), or "unknown"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")
