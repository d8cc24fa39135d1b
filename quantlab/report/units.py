"""Human units for the report's tables, sentences and plot axes: byte sizes with a decimal prefix,
percentages, numbers with a fixed count of significant digits, a value with its standard error."""
from __future__ import annotations

from quantlab.analysis import is_number

MISSING = "—"


def _fmt_si(x, unit) -> str:
    """3 significant digits with a decimal prefix: 1234567 B -> '1.23 MB', 999552 B -> '1 MB' (a value
    that rounds up to 1000 of a prefix takes the next one, never '1e+03 kB')."""
    if not is_number(x):
        return MISSING
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size * 0.9995:
            return f"{x / size:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _fmt_bytes(n) -> str:
    return _fmt_si(n, "B")


def _fmt_pct(x, signed=False) -> str:
    if not is_number(x):
        return MISSING
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def _fmt_num(x, digits=4) -> str:
    return f"{x:.{digits}g}" if is_number(x) else MISSING


def _fmt_with_error(x, err, formatter, error_formatter=None) -> str:
    if not is_number(x):
        return MISSING
    if not is_number(err):
        return formatter(x)
    return f"{formatter(x)} ± {(error_formatter or formatter)(err)}"
