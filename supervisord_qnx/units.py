"""Human sizes and durations used in tenant files ("16MiB", "4M", 1048576)."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(value: object) -> int:
    """Return a byte count. Binary multiples only: "4M", "4MB" and "4MiB" all mean 4 * 2**20.

    Memory limits are page-granular in every kernel we target, so the SI/IEC
    distinction would only invite off-by-5% surprises; we follow systemd and
    treat K/M/G as powers of 1024.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 16MiB, 4M or a byte count, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative ({value})")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size; write e.g. '16MiB', '4M', '512K' or bytes")
        number, unit, _ = m.groups()
        return int(float(number) * (1024 ** _POWERS[unit.upper()]))
    raise ValueError(f"expected a size such as '16MiB', got {type(value).__name__}")


def format_size(value: int | None) -> str:
    """Render bytes the way ``parse_size`` reads them back ("16MiB", "1.5GiB", "512B")."""
    if value is None:
        return "-"
    for unit, power in (("PiB", 5), ("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        scale = 1024**power
        if value >= scale:
            number = value / scale
            return f"{number:.0f}{unit}" if number == int(number) else f"{number:.1f}{unit}"
    return f"{value}B"
