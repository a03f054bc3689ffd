"""The GGUF card's chart: file size against mean KL divergence from BF16, one labelled point per
quantized GGUF file, as a PNG the Hub renders in the card.

People choose a quant by this trade-off. The figures are the verification manifest's (sizes and
KL divergence are measured once, by the stages that own them). The PNG's bytes depend only on
those figures and the plotting library: no date or software tag is written, so a rebuilt chart
has the same sha256 (stage outputs are compared by hash).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from release.artifacts import Manifest
from release.spec import CONVERTED, Spec

FILE = "gguf-size-vs-kld.png"  # next to the GGUF repo's README.md, which links it by this name
WIDTH, HEIGHT, DPI = 8.0, 5.0, 100  # inches, dots per inch: 800 x 500 pixels
UNQUANTIZED = tuple(t for t in CONVERTED if t.startswith(("F", "BF")))  # F16, BF16: the reference sizes


@dataclass(frozen=True)
class Point:
    quant: str
    size: int  # bytes
    kld: float  # mean KL divergence from BF16


def points(spec: Spec, vm: Manifest) -> list[Point]:
    """Every quantized GGUF file the verification measured, smallest first."""
    figures = vm.figures.get("variants", {})
    out = []
    for a in vm.figures.get("artifacts", {}).values():
        q = a.get("quant")
        if not q or q in UNQUANTIZED or spec.variants.get(a.get("variant"), None) is None:
            continue
        kld = figures.get(f"gguf:{q}", {}).get("kld_mean")
        if kld is not None:
            out.append(Point(q, int(a["size"]), float(kld)))
    return sorted(out, key=lambda p: (p.size, p.quant))


# Where a label may sit relative to its point (offset in points, horizontal alignment), in the
# order tried: up-right first, then below, left, and further out. Quant types of close sizes and
# fidelities (IQ4_XS beside Q4_K_M) would otherwise print over each other.
PLACES = ((6, 6, "left"), (6, -16, "left"), (-6, 6, "right"), (-6, -16, "right"), (6, 20, "left"),
          (6, -30, "left"), (-6, 20, "right"), (-6, -30, "right"), (6, 34, "left"), (6, -44, "left"))


def figure(title: str, pts: list[Point]):
    """The chart as a matplotlib Figure (Agg canvas), each label placed where it overlaps no
    other label and no point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = [p.size / 1e9 for p in pts], [p.kld for p in pts]
    ax.plot(xs, ys, "o", color="#1f77b4", markersize=8)
    if all(y > 0 for y in ys):
        ax.set_yscale("log")  # the quant types span orders of magnitude
    ax.set_xlabel("file size (GB)")
    ax.set_ylabel("mean KL divergence from BF16 (lower is closer)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    fig.tight_layout()  # before the labels: their places are measured on the final layout
    renderer = canvas.get_renderer()
    half = 4 * DPI / 72  # a marker's half width in pixels (markersize 8 points)
    taken = [_box(ax, x, y, half) for x, y in zip(xs, ys, strict=True)]
    for p, x, y in zip(pts, xs, ys, strict=True):
        for dx, dy, align in PLACES:
            label = ax.annotate(p.quant, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=10,
                                ha=align)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in taken) or (dx, dy, align) == PLACES[-1]:
                taken.append(box)
                break
            label.remove()
    return fig


def _box(ax, x: float, y: float, half: float):
    from matplotlib.transforms import Bbox

    cx, cy = ax.transData.transform((x, y))
    return Bbox([[cx - half, cy - half], [cx + half, cy + half]])


def render(title: str, pts: list[Point]) -> bytes:
    """The chart as PNG bytes (matplotlib's Agg renderer, no display needed)."""
    buf = io.BytesIO()
    # no Software tag (it names the library version) and no date: the bytes follow the figures
    figure(title, pts).savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def chart(spec: Spec, vm: Manifest | None) -> bytes | None:
    """The release's chart, or None without a verification or with no measured quantized file."""
    pts = points(spec, vm) if vm is not None else []
    if not pts:
        return None
    return render(f"{spec.release.name} GGUF: size vs. fidelity", pts)
