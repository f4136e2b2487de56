"""Plots: measured smoothness ratios against the gradient norm with the fitted envelopes, and
min-so-far gradient norms against epochs next to the theoretical rate. PNG files (matplotlib's
Agg backend, as ``hybridft.study.plots``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hybridft.study.plots import _pyplot
from hybridft.theory.advice import BLOCKS
from hybridft.theory.estimates import ALL, Fit
from hybridft.theory.pairs import Pair

SYMBOL = {"theta": "θ", "phi": "φ"}
MARKERS = {"gradient": "o", "random": "s", "power": "^"}


def ratios(pairs: Sequence[Pair], fits: Sequence[Fit], path: str | Path, *, title: str) -> Path:
    """A grid: row = measured block B, column = moved block C; points (||grad_B f_S(x)||, ratio) on
    log-log axes, one marker per direction kind, and each kind's (L0, L1) envelope as a curve."""
    plt = _pyplot()
    blocks = [b for b in BLOCKS if any(b in p.ratio for p in pairs)]
    fig, axes = plt.subplots(len(blocks), len(blocks), figsize=(5.2 * len(blocks), 4.2 * len(blocks)), squeeze=False)
    envelopes = {(f.measured, f.moved, f.kind): f for f in fits}
    for row, measured in enumerate(blocks):
        for col, moved in enumerate(blocks):
            ax = axes[row][col]
            chosen = [p for p in pairs if p.moved == moved and measured in p.ratio]
            for kind in MARKERS:
                pts = [(p.grad_norm[measured], p.ratio[measured]) for p in chosen if p.kind == kind]
                if not pts:
                    continue
                g, r = zip(*pts)
                line = ax.scatter(g, r, marker=MARKERS[kind], s=22, alpha=0.75, label=kind)
                fit = envelopes.get((measured, moved, kind))
                if fit is not None:  # a straight line in linear space: many points on log axes
                    low, high = 0.9 * min(g), 1.1 * max(g)
                    xs = [low * (high / low) ** (i / 49) for i in range(50)]
                    ax.plot(xs, [fit.l0.value + fit.l1.value * x for x in xs], color=line.get_facecolor()[0], lw=1)
            pooled = envelopes.get((measured, moved, ALL))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on short ranges
            ax.set_xlabel(f"‖∇{SYMBOL[measured]} f_S(x)‖")
            ax.set_ylabel(f"‖Δ∇{SYMBOL[measured]}‖ / ‖Δ{SYMBOL[moved]}‖")
            label = "" if pooled is None else f"  L0={pooled.l0.value:.3g}, L1={pooled.l1.value:.3g}"
            ax.set_title(f"{SYMBOL[measured]}-gradient, {SYMBOL[moved]} moved{label}", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def rates(curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str, rate: float = -0.25) -> Path:
    """Min-so-far ||grad f|| after each epoch (epoch 1 = after the first) on log-log axes, with the
    line C T^rate for the smallest C that stays above every curve (a guide to the slope: the
    bound's own constant depends on unknowns such as inf f)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    constant = 0.0
    for name, norms in curves.items():
        best, running = [], float("inf")
        for value in norms:
            running = min(running, value)
            best.append(running)
        epochs = list(range(1, len(best) + 1))
        ax.plot(epochs, best, label=name, lw=1.4)
        constant = max(constant, max(b * t ** (-rate) for t, b in zip(epochs, best)))
    xs = [1, max(len(v) for v in curves.values())]
    ax.plot(xs, [constant * x**rate for x in xs], "k--", lw=1, label=f"{constant:.3g} T^{rate:g} (theory's order)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("epochs T")
    ax.set_ylabel("min over t ≤ T of ‖∇f(x_t)‖")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
