"""What the `step`, `decode` and `data` suites share: the device's name, and writing a suite's
table (`<out>/<name>.txt`) and results (`<out>/<name>.json`: device, arguments, one object per row)."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def write(a, results: list, table: str, device: str) -> None:
    """Print nothing; write the table and JSON if `--out` was given."""
    if not a.out:
        return
    import torch
    os.makedirs(a.out, exist_ok=True)
    suite = getattr(a, "suite", "") or "result"
    stem = os.path.join(a.out, a.name or suite)
    with open(stem + ".txt", "w") as f:
        f.write(table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"suite": suite, "device": device, "torch": torch.__version__,
                   "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "args": {k: v for k, v in vars(a).items() if k != "func"},
                   "results": [strict(asdict(r)) for r in results]}, f, indent=1)


def strict(row: dict) -> dict:
    """NaN (not measured) as null: strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def add_common(p, name_default: str) -> None:
    p.add_argument("--out", help="folder for <name>.txt and <name>.json")
    p.add_argument("--name", help=f"result file stem (default {name_default})")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: a few seconds, for CI")


def int_list(text: str) -> list:
    from ..errors import InputError
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"{text!r}: give one integer or a comma-separated list (128,512)") from None
    if not values or min(values) < 0:
        raise InputError(f"{text!r}: give non-negative integers")
    return values
