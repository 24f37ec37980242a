"""Sizes as people read them: `human_bytes(1536) == '1.5 KB'` (binary units, as `ls -lh`)."""


def human_bytes(n: int | float) -> str:
    """1536 -> '1.5 KB'; bytes are whole, larger units one decimal, GB the largest unit."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
