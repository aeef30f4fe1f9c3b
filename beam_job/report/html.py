"""HTML building blocks shared by the report pages: page shell and CSS, escaping, JPEG data URIs, inline SVG plots.

Everything here is pure Python + numpy + Pillow and produces self-contained markup: no network, no
JavaScript library, no external stylesheet. Plots are hand-written SVG (histogram, horizontal bars,
scatter) because the reports must open offline and the project depends on no plotting library.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

# Viridis at five stops (dark blue -> yellow): low attention dark, high attention bright.
_COLORMAP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
PLOT_WIDTH, PLOT_HEIGHT = 480, 220
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 56, 12, 26, 38
BAR_COLOR = "#3b528b"
SECOND_COLOR = "#5ec962"

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;padding:12px;color:#1d1d1f;
background:#fafafa;line-height:1.4;font-size:15px}
main{max-width:1200px;margin:0 auto}
h1{font-size:1.4em;margin:.2em 0 .4em;word-break:break-all}h2{font-size:1.15em;margin:1.4em 0 .5em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.3em 0;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:.85em}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;overflow-wrap:anywhere}
ul.examples{margin:0;padding-left:1.2em}
details{margin:.4em 0}summary{cursor:pointer;color:#0b57d0}
.warning{background:#b00020;color:#fff;padding:12px 16px;font-weight:700;font-size:1.1em;border-radius:6px;
margin:.6em 0}
.note{background:#fff4ce;padding:6px 10px;border-radius:4px;margin:.4em 0}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.plots figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}
figcaption{font-size:.85em;color:#555}
svg.plot{width:100%;height:auto;display:block}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;padding:6px;min-width:0}
.overlay{position:relative;display:inline-block;max-width:100%;line-height:0}
.overlay img{max-width:100%;height:auto;display:block}
.overlay svg{position:absolute;left:0;top:0;width:100%;height:100%}
svg.kp circle{fill:currentColor;fill-opacity:.2;stroke:currentColor;stroke-width:1.1}
.muted{color:#666;font-size:.85em}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;font-size:.8em;color:#fff}
.verified{background:#1a7f37}.unverified{background:#888}
.positive{background:#1a7f37}.junk{background:#b58900}.negative{background:#b00020}.ignored{background:#888}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.tile{background:#fff;border:3px solid #bbb;padding:4px;min-width:0;font-size:.85em}
.tile img{width:100%;height:auto;display:block}
.tile.is-verified{border-color:#1a7f37}
.qhead{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.tile.query{width:260px;max-width:100%;border-color:#1e78ff}
a{color:#0b57d0}
"""

_CSS_ONE_LINE = "".join(line.strip() for line in CSS.splitlines())


def esc(value) -> str:
    """HTML-escaped text of any value (None -> empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    """Numbers for humans: ints as is, floats with `digits` significant decimals, None as an em dash."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "\u2014"
        if v == int(v) and abs(v) < 1e12:
            return str(int(v))
        if abs(v) >= 1000:
            return f"{v:.0f}"
        if abs(v) < 1e-3:
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def page(title: str, body: str, script: str = "") -> str:
    """A complete HTML document (UTF-8, mobile viewport, inline CSS, optional inline script)."""
    tail = f"<script>{script}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{_CSS_ONE_LINE}</style></head>"
        f"<body><main>{body}</main>{tail}</body></html>\n"
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = (), attrs: str = "") -> str:
    """A <table> in a horizontal-scroll wrapper; cells are already-escaped HTML; `numeric` columns align right."""
    num = set(numeric)

    def cls(i: int) -> str:
        return ' class="num"' if i in num else ""

    head = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(headers))
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<div class=\"scroll\"><table {attrs}>{thead}<tbody>{body}</tbody></table></div>"


# --------------------------------------------------------------------------------------------- images


def thumbnail(image: np.ndarray, max_side: int) -> Image.Image:
    """A PIL RGB thumbnail of an HxWx3 uint8 array, longest side at most max_side (never enlarged)."""
    pil = Image.fromarray(np.asarray(image)[..., :3], "RGB")
    pil.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return pil


def jpeg_bytes(image: Image.Image, quality: int = 82) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def colormap(t: np.ndarray) -> list[str]:
    """#rrggbb colours of values t in [0, 1] (viridis-like, clipped)."""
    t = np.clip(np.asarray(t, np.float64).ravel(), 0.0, 1.0) * (len(_COLORMAP) - 1)
    lo = np.floor(t).astype(int)
    hi = np.minimum(lo + 1, len(_COLORMAP) - 1)
    frac = (t - lo)[:, None]
    rgb = np.rint(_COLORMAP[lo] * (1 - frac) + _COLORMAP[hi] * frac).astype(int)
    return ["#{:02x}{:02x}{:02x}".format(*tuple(c)) for c in rgb]


def colorbar_svg(low: float, high: float, label: str, width: int = 240) -> str:
    """A small horizontal legend of the colour map from low to high."""
    stops = "".join(f"<stop offset=\"{i / (len(_COLORMAP) - 1):.2f}\" stop-color=\"{c}\"/>"
                    for i, c in enumerate(colormap(np.linspace(0, 1, len(_COLORMAP)))))
    return (
        f"<svg class=\"legend\" viewBox=\"0 0 {width} 34\" width=\"{width}\" height=\"34\" role=\"img\">"
        f"<defs><linearGradient id=\"cmap\">{stops}</linearGradient></defs>"
        f"<rect x=\"0\" y=\"2\" width=\"{width}\" height=\"12\" fill=\"url(#cmap)\"/>"
        f"<text x=\"0\" y=\"28\" font-size=\"11\">{esc(fmt(low))}</text>"
        f"<text x=\"{width / 2}\" y=\"28\" font-size=\"11\" text-anchor=\"middle\">{esc(label)}</text>"
        f"<text x=\"{width}\" y=\"28\" font-size=\"11\" text-anchor=\"end\">{esc(fmt(high))}</text></svg>"
    )


# --------------------------------------------------------------------------------------------- plots


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, v = [], start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _line(x1: float, y1: float, x2: float, y2: float, color: str = "#333") -> str:
    return f"<line x1=\"{x1:.1f}\" y1=\"{y1:.1f}\" x2=\"{x2:.1f}\" y2=\"{y2:.1f}\" stroke=\"{color}\"/>"


def _text(x: float, y: float, text: str, size: int = 10, anchor: str = "middle") -> str:
    return f"<text x=\"{x:.1f}\" y=\"{y:.1f}\" font-size=\"{size}\" text-anchor=\"{anchor}\">{esc(text)}</text>"


class _Frame:
    """Maps data coordinates to the SVG plot area and draws the axes."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]):
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1.0
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1.0
        self.left, self.right = _MARGIN_LEFT, PLOT_WIDTH - _MARGIN_RIGHT
        self.top, self.bottom = _MARGIN_TOP, PLOT_HEIGHT - _MARGIN_BOTTOM

    def px(self, x) -> np.ndarray:
        return self.left + (np.asarray(x, np.float64) - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y) -> np.ndarray:
        return self.bottom - (np.asarray(y, np.float64) - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def axes(self, xlabel: str, ylabel: str, x_ticks: bool = True, x_integer: bool = False,
             y_integer: bool = False, x_tick_values: Sequence[float] | None = None) -> str:
        """The axes with ticks; x_tick_values: these x ticks instead of evenly spaced ones over the range."""
        parts = [_line(self.left, self.bottom, self.right, self.bottom),
                 _line(self.left, self.top, self.left, self.bottom)]
        if x_ticks:
            for t in _nice_ticks(self.x0, self.x1) if x_tick_values is None else x_tick_values:
                if x_integer and t != int(t):
                    continue
                x = float(self.px(t))
                parts.append(_line(x, self.bottom, x, self.bottom + 4) + _text(x, self.bottom + 15, fmt(t)))
        for t in _nice_ticks(self.y0, self.y1):
            if y_integer and t != int(t):
                continue
            y = float(self.py(t))
            parts.append(_line(self.left - 4, y, self.right, y, "#eee")
                         + _text(self.left - 6, y + 3, fmt(t), anchor="end"))
        parts.append(f"<text x=\"{(self.left + self.right) / 2:.1f}\" y=\"{PLOT_HEIGHT - 6}\" font-size=\"11\" "
                     f"text-anchor=\"middle\">{esc(xlabel)}</text>")
        parts.append(f"<text x=\"12\" y=\"{(self.top + self.bottom) / 2:.1f}\" font-size=\"11\" text-anchor=\"middle\" "
                     f"transform=\"rotate(-90 12 {(self.top + self.bottom) / 2:.1f})\">{esc(ylabel)}</text>")
        return "".join(parts)


def _svg(title: str, inner: str, name: str) -> str:
    return (f"<svg class=\"plot\" data-plot=\"{esc(name)}\" viewBox=\"0 0 {PLOT_WIDTH} {PLOT_HEIGHT}\" role=\"img\" "
            f"aria-label=\"{esc(title)}\"><text x=\"{PLOT_WIDTH / 2}\" y=\"16\" font-size=\"13\" font-weight=\"600\" "
            f"text-anchor=\"middle\">{esc(title)}</text>{inner}</svg>")


def _empty(title: str, name: str, why: str = "no data") -> str:
    return _svg(title, f"<text x=\"{PLOT_WIDTH / 2}\" y=\"{PLOT_HEIGHT / 2}\" text-anchor=\"middle\" font-size=\"12\" "
                       f"fill=\"#666\">{esc(why)}</text>", name)


def histogram_svg(values, title: str, xlabel: str, name: str, bins: int = 30, integer: bool = False) -> str:
    """Histogram of `values` as SVG bars; each bar carries data-count (the number of values in it).

    Integers spanning no more than `bins` values get one bar per value, centred on it, ticks only at values
    in the data's range; a single value (every image with 1000 keypoints) is one bar with one tick at it."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return _empty(title, name)
    lo, hi = float(values.min()), float(values.max())
    unit_bins = integer and int(hi - lo) + 1 <= bins
    ticks: list[float] | None = None
    if unit_bins:
        edges = np.arange(lo, hi + 2, dtype=np.float64) - 0.5
        ticks = [t for t in _nice_ticks(lo, hi) if t == int(t) and lo <= t <= hi]
    elif integer:
        edges = np.linspace(lo, hi + 1, bins + 1)
    elif hi > lo:
        edges = np.linspace(lo, hi, bins + 1)
    else:  # one value: one bar around it
        half = abs(lo) * 0.05 or 0.5
        edges, ticks = np.array([lo - half, lo + half]), [lo]
    counts, edges = np.histogram(values, bins=edges)
    width = float(edges[-1] - edges[0])
    pad = width if len(counts) == 1 else (1.0 if unit_bins and len(counts) < 5 else 0.0)  # room around few bars
    frame = _Frame((float(edges[0]) - pad, float(edges[-1]) + pad), (0.0, float(counts.max())))
    bars = []
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        x0, x1 = float(frame.px(a)), float(frame.px(b))
        y = float(frame.py(c))
        label = fmt((a + b) / 2) if unit_bins else f"{fmt(a)} \u2013 {fmt(b)}"
        bars.append(f"<rect x=\"{x0:.1f}\" y=\"{y:.1f}\" width=\"{max(x1 - x0 - 1, 0.5):.1f}\" "
                    f"height=\"{frame.bottom - y:.1f}\" fill=\"{BAR_COLOR}\" data-count=\"{int(c)}\">"
                    f"<title>{esc(label)}: {int(c)}</title></rect>")
    axes = frame.axes(xlabel, "images" if integer else "count", x_integer=integer, y_integer=True,
                      x_tick_values=ticks)
    return _svg(title, axes + "".join(bars), name)


def bars_svg(labels: Sequence[str], series: dict[str, Sequence[float]], title: str, xlabel: str, name: str) -> str:
    """Horizontal grouped bars: one group per label, one bar per series (at most two series shown in colour)."""
    if not labels:
        return _empty(title, name)
    colors = [BAR_COLOR, SECOND_COLOR, "#21918c", "#fde725"]
    vmax = max([float(v) for vals in series.values() for v in vals] + [0.0])
    frame = _Frame((0.0, vmax if vmax > 0 else 1.0), (0.0, 1.0))
    left = 96
    frame.left = left
    band = (frame.bottom - frame.top) / len(labels)
    bar_h = band * 0.8 / max(len(series), 1)
    parts = []
    for i, label in enumerate(labels):
        y_band = frame.top + i * band
        parts.append(f"<text x=\"{left - 6}\" y=\"{y_band + band / 2 + 4:.1f}\" font-size=\"11\" text-anchor=\"end\">"
                     f"{esc(label)}</text>")
        for j, (sname, vals) in enumerate(series.items()):
            v = float(vals[i])
            w = float(frame.px(v)) - left
            y = y_band + band * 0.1 + j * bar_h
            parts.append(f"<rect x=\"{left}\" y=\"{y:.1f}\" width=\"{max(w, 0.5):.1f}\" height=\"{bar_h:.1f}\" "
                         f"fill=\"{colors[j % len(colors)]}\" data-series=\"{esc(sname)}\" data-label=\"{esc(label)}\" "
                         f"data-value=\"{v:g}\"><title>{esc(label)} {esc(sname)}: {esc(fmt(v))}</title></rect>")
    legend = "".join(
        f"<rect x=\"{PLOT_WIDTH - 150 + 0 * j}\" y=\"{frame.top + 2 + 14 * j}\" width=\"10\" height=\"10\" "
        f"fill=\"{colors[j % len(colors)]}\"/><text x=\"{PLOT_WIDTH - 136}\" y=\"{frame.top + 11 + 14 * j}\" "
        f"font-size=\"10\">{esc(s)}</text>" for j, s in enumerate(series))
    axis = (f"<line x1=\"{left}\" y1=\"{frame.bottom}\" x2=\"{frame.right}\" y2=\"{frame.bottom}\" stroke=\"#333\"/>"
            + "".join(f"<text x=\"{float(frame.px(t)):.1f}\" y=\"{frame.bottom + 15}\" font-size=\"10\" "
                      f"text-anchor=\"middle\">{esc(fmt(t))}</text>" for t in _nice_ticks(0.0, frame.x1))
            + f"<text x=\"{(left + frame.right) / 2:.1f}\" y=\"{PLOT_HEIGHT - 6}\" font-size=\"11\" "
              f"text-anchor=\"middle\">{esc(xlabel)}</text>")
    return _svg(title, axis + "".join(parts) + legend, name)


def scatter_svg(xs, ys, title: str, xlabel: str, ylabel: str, name: str) -> str:
    """Scatter plot of points (xs[i], ys[i]); the caller bounds the number of points."""
    xs, ys = np.asarray(xs, np.float64).ravel(), np.asarray(ys, np.float64).ravel()
    if xs.size == 0:
        return _empty(title, name)
    frame = _Frame((0.0, float(xs.max()) * 1.05), (0.0, float(ys.max()) * 1.05))
    dots = "".join(f"<circle cx=\"{float(x):.1f}\" cy=\"{float(y):.1f}\" r=\"2.5\" fill=\"{BAR_COLOR}\" "
                   "fill-opacity=\"0.5\"/>" for x, y in zip(frame.px(xs), frame.py(ys), strict=True))
    return _svg(title, frame.axes(xlabel, ylabel) + dots, name)


def figure(svg: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure>{svg}{cap}</figure>"
