"""Reading a horizon study's points: the collapse point (CP@60), the gate's verdict point,
the throughput verdict and the plot (``horizon.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.engine import precision

if TYPE_CHECKING:
    from flows.studies.horizon import HorizonSettings


#: The issue's throughput target: amortised seconds per edit, measurements included, over the
#: first 1,000 edits of an AlphaEdit+NAS stream at batch size 10 (2 cores), by bf16 support.
AMORTISED_TARGET = {"bf16": 1.0, "no bf16": 2.0}
AMORTISED_OVER = 1000


def amortised_line(label: str, points: list[dict[str, Any]], settings: HorizonSettings) -> str | None:
    """The throughput verdict of a method's points: amortised s/edit with measurements at the
    last point within the first 1,000 edits, against the target of this machine's kind."""
    within = [p for p in points if p["edits"] <= AMORTISED_OVER and "seconds_per_edit_all" in p]
    if not within:
        return None
    p = within[-1]
    kind = "bf16" if precision.cpu_facts()["bf16_flags"] else "no bf16"
    target = AMORTISED_TARGET[kind]
    applies = label == "alphaedit+nas" and settings.batch_size == 10 and p["edits"] == AMORTISED_OVER
    verdict = ("met" if p["seconds_per_edit_all"] <= target else "missed") if applies else "not the target's stream"
    return (f"{label}: {p['seconds_per_edit_all']:.2f} s/edit amortised over {p['edits']} edits at batch "
            f"{settings.batch_size}, measurements included ({p['seconds_per_edit']:.2f} s editing alone); "
            f"target <= {target:.1f} s on a CPU with {kind} ({verdict}); phases {p.get('phase_seconds', {})}")


#: CP@60, the literature's collapse point: the first measurement with an editing score below
#: 60 or a canary perplexity above twice the base model's.
CP_MIN_EDITING_SCORE = 60.0
CP_MAX_PERPLEXITY_RATIO = 2.0


def collapse_point(points: list[dict[str, Any]]) -> int | None:
    """Edits at the first point past CP@60 (None: never). The product's own verdict, with
    every check of ``collapse``, is ``verdict_point``."""
    for p in points:
        m = p["metrics"]
        low_score = m.get("editing_score") is not None and m["editing_score"] < CP_MIN_EDITING_SCORE
        if low_score or m.get("perplexity_ratio", 1.0) > CP_MAX_PERPLEXITY_RATIO:
            return p["edits"]
    return None


def verdict_point(points: list[dict[str, Any]]) -> int | None:
    """Edits at the first point whose collapse verdict (the gate's checks) failed."""
    return next((p["edits"] for p in points if p["collapsed"]), None)


def past_collapse(points: list[dict[str, Any]], settings: HorizonSettings) -> bool:
    """Whether a method has measured ``stop_after_collapse`` points beyond its CP@60."""
    cp = collapse_point(points)
    return cp is not None and sum(p["edits"] > cp for p in points) >= settings.stop_after_collapse


#: (point key, panel title, log scale) of horizon.png.
PANELS = (
    ("norm_ratio_max", "max ||W_t|| / ||W_0|| (log)", True),
    ("editing_score", "editing score (retention)", False),
    ("perplexity_ratio", "canary perplexity / base", False),
    ("v_norm_before_mean", "mean ||v*|| before NAS", False),
)


def _series(label: str, res: dict[str, Any], base_point: dict[str, Any], key: str) -> list[tuple[int, float]]:
    first = [] if key == "v_norm_before_mean" else [(0, base_point.get(key))]
    pts = first + [(p["edits"], p.get(key, p["metrics"].get(key))) for p in res["points"]]
    return [(x, y) for x, y in pts if y is not None]


def plot(results: dict[str, Any], path: Path) -> Path:
    """horizon.png: norm ratio (log), editing score, perplexity ratio and mean ||v*|| vs edits,
    one line per method (dashed without NAS), each method's collapse point marked with an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(19, 4.4))
    for ax, (key, title, log_scale) in zip(axes, PANELS, strict=True):
        for label, res in results["methods"].items():
            pts = _series(label, res, results["base_point"], key)
            if not pts:
                continue
            line, = ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=label,
                            linestyle="-" if label.endswith("+nas") else "--")
            cp = res.get("collapse_point")
            hit = [(x, y) for x, y in pts if x == cp]
            if hit:
                ax.plot(*hit[0], marker="x", ms=11, mew=2.5, color=line.get_color())
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("edits so far")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Editing horizon: {results['model']} ({results['settings']['stream_length']} CounterFact edits, "
                 f"batch {results['settings']['batch_size']}; x = collapse point)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
