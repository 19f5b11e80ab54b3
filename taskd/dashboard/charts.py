"""Charts drawn on the server as inline SVG (no JavaScript, no library)."""
from __future__ import annotations

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 720, 160, 24


def per_minute(rows, first_minute: int, minutes: int = 60) -> Markup:
    """Stacked bars of succeeded (green) and failed (red) tasks for each minute."""
    by_minute = {r["minute"]: r for r in rows}
    peak = max([r["succeeded"] + r["failed"] for r in rows] + [1])
    slot = (WIDTH - PAD) / minutes
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + PAD}" role="img" '
             f'aria-label="tasks per minute, last {minutes} minutes">',
             f'<text x="0" y="12" class="axis">{peak}/min</text>',
             f'<line x1="{PAD}" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}" class="axis"/>']
    for i in range(minutes):
        r = by_minute.get(first_minute + i)
        if not r:
            continue
        x = PAD + i * slot
        ok_h = (HEIGHT - 16) * r["succeeded"] / peak
        bad_h = (HEIGHT - 16) * r["failed"] / peak
        title = escape(f"{r['succeeded']} succeeded, {r['failed']} failed, {r['retried']} retried")
        parts.append(f'<g><title>{title}</title>'
                     f'<rect class="ok" x="{x:.1f}" y="{HEIGHT - ok_h:.1f}" width="{slot - 1:.1f}" height="{ok_h:.1f}"/>'
                     f'<rect class="bad" x="{x:.1f}" y="{HEIGHT - ok_h - bad_h:.1f}" width="{slot - 1:.1f}" height="{bad_h:.1f}"/></g>')
    parts.append(f'<text x="{PAD}" y="{HEIGHT + 16}" class="axis">-{minutes} min</text>'
                 f'<text x="{WIDTH - 30}" y="{HEIGHT + 16}" class="axis">now</text></svg>')
    return Markup("".join(parts))
