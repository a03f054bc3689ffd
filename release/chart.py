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


def render(title: str, pts: list[Point]) -> bytes:
    """The chart as PNG bytes (matplotlib's Agg renderer, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = [p.size / 1e9 for p in pts], [p.kld for p in pts]
    ax.plot(xs, ys, "o", color="#1f77b4", markersize=8)
    for p, x, y in zip(pts, xs, ys, strict=True):
        ax.annotate(p.quant, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=10)
    if all(y > 0 for y in ys):
        ax.set_yscale("log")  # the quant types span orders of magnitude
    ax.set_xlabel("file size (GB)")
    ax.set_ylabel("mean KL divergence from BF16 (lower is closer)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    fig.tight_layout()
    buf = io.BytesIO()
    # no Software tag (it names the library version) and no date: the bytes follow the figures
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def chart(spec: Spec, vm: Manifest | None) -> bytes | None:
    """The release's chart, or None without a verification or with no measured quantized file."""
    pts = points(spec, vm) if vm is not None else []
    if not pts:
        return None
    return render(f"{spec.release.name} GGUF: size vs. fidelity", pts)
