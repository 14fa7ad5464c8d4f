"""Layer tables and a model comparison for the registered networks (CLI over cnn_jax.analysis).

    python -m cnn_jax.summary --arch=vgg16 [--image_size=224] [--format=table|markdown|csv|json]
    python -m cnn_jax.summary --arch=resnet50 --xla  # also XLA's FLOP count of the compiled pass
    python -m cnn_jax.summary --compare [--models='resnet*'] [--plot=zoo.png]

The layer table gives, per conv / dense / pooling / norm layer: output shape, parameters,
multiply-accumulates and the receptive field (size, jump, start; Araujo et al. 2019) with totals.
The comparison lists every registered model with its depth, parameters, MACs (at the registry
entry's default input: 224x224, the CIFAR networks of the papers 32x32) and the entry's
torchvision ImageNet top-1 where torchvision ships weights for that exact layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import List, Optional, Sequence

from absl import app, flags

from cnn_jax import analysis, cli
from cnn_jax.models import create_model, list_models, model_info

TOP1_SOURCE = ("torchvision model docs, acc@1 on ImageNet-1K val, IMAGENET1K_V1 weights "
               "(https://pytorch.org/vision/stable/models.html)")


def default_image_size(name: str) -> int:
    """The registry entry's default input: 224 for ImageNet networks, 32 for the CIFAR ones."""
    return model_info(name).default_input_size


def analyze_registered(name: str, image_size: Optional[int] = None,
                       num_classes: Optional[int] = None) -> analysis.Analysis:
    """``analysis.analyze`` of a registered model on a square RGB image (cached per arguments)."""
    return _analyze_cached(name, image_size or default_image_size(name), num_classes)


@functools.lru_cache(maxsize=None)
def _analyze_cached(name: str, image_size: int, num_classes: Optional[int]) -> analysis.Analysis:
    model = create_model(name, num_classes=num_classes)
    return analysis.analyze(model, (1, image_size, image_size, 3))


@dataclasses.dataclass(frozen=True)
class ComparisonRow:
    name: str
    image_size: int
    weight_layers: int  # conv + dense layers with weights
    depth: int  # longest chain of weight layers, the papers' depth
    params: int
    macs: int
    top1: Optional[float]  # the entry's torchvision top-1, None where torchvision has no weights


def compare_models(names: Optional[Sequence[str]] = None,
                   image_size: Optional[int] = None) -> List[ComparisonRow]:
    """One row per model (default: all registered), each at its default (or the given) size."""
    rows = []
    for name in list_models() if names is None else names:
        a = analyze_registered(name, image_size)
        tv = model_info(name).torchvision
        rows.append(ComparisonRow(name, a.input_shape[1], a.totals.weight_layers, a.totals.depth,
                                  a.totals.params, a.totals.macs, tv.top1 if tv else None))
    return rows


def format_comparison(rows: Sequence[ComparisonRow], fmt: str = "table") -> str:
    """The comparison as ``table``, ``markdown``, ``csv`` or ``json``, with the top-1 source."""
    if fmt == "json":
        return json.dumps({"models": [dataclasses.asdict(r) for r in rows],
                           "top1_source": TOP1_SOURCE}, indent=1) + "\n"
    header = ("model", "input", "weight layers", "depth", "params", "GMACs", "top-1 %")
    raw = fmt == "csv"
    cells = [[r.name, f"{r.image_size}x{r.image_size}", str(r.weight_layers), str(r.depth),
              str(r.params) if raw else f"{r.params:,}",
              str(r.macs) if raw else f"{r.macs / 1e9:.3f}",
              "" if r.top1 is None else f"{r.top1:g}"] for r in rows]
    body = analysis.render_table(header, cells, fmt)
    if fmt == "csv":
        return body
    return body + f"\ntop-1: {TOP1_SOURCE}; blank = no torchvision weights for this layout.\n"


def _family(name: str) -> str:
    return model_info(name).family


def _label(r: ComparisonRow) -> str:
    return r.name if r.top1 is None else f"{r.name} ({r.top1:.1f}%)"


def plot_comparison(rows: Sequence[ComparisonRow], path: Optional[str] = None):
    """Parameters against MACs (log-log), marker area ~ depth, labelled; saves a PNG if ``path``.

    Draws on a bare ``Figure`` with the Agg canvas, so it works headless and never switches the
    pyplot backend of a notebook; returns the figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    families = sorted({_family(r.name) for r in rows})
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    for fam in families:
        sel = [r for r in rows if _family(r.name) == fam]
        ax.scatter([r.macs / 1e9 for r in sel], [r.params / 1e6 for r in sel],
                   s=[12 + 2.0 * r.depth for r in sel], c=colors[fam], alpha=0.6,
                   edgecolors="k", linewidths=0.5, label=fam)
    ax.set_xscale("log")
    ax.set_yscale("log")
    macs = [r.macs / 1e9 for r in rows]
    params = [r.params / 1e6 for r in rows]
    ax.set_xlim(min(macs) / 1.8, max(macs) * 2.5)  # room for the labels
    ax.set_ylim(min(params) / 1.8, max(params) * 3)
    ax.set_xlabel("multiply-accumulates per image (G; 224x224, CIFAR nets 32x32)")
    ax.set_ylabel("parameters (M)")
    ax.set_title("Registered models: parameters vs compute (marker area ~ depth)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.005, f"top-1 in brackets: {TOP1_SOURCE}", fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    # Models at (nearly) the same point share one label; labels are placed greedily at the
    # first offset that overlaps no earlier label.
    groups: List[List[ComparisonRow]] = []
    for r in sorted(rows, key=lambda r: (r.macs, r.params)):
        for g in groups:
            if abs(g[0].macs / r.macs - 1) < 0.03 and abs(g[0].params / r.params - 1) < 0.03:
                g.append(r)
                break
        else:
            groups.append([r])
    renderer = canvas.get_renderer()
    placed = []
    offsets = [(5, 3), (5, -4), (-5, 3), (-5, -4)]
    offsets += [(sx * 5, sy * d) for d in (14, 26, 38, 50) for sy in (1, -1) for sx in (1, -1)]
    for g in groups:
        text = "\n".join(_label(r) for r in g)
        xy = (g[0].macs / 1e9, g[0].params / 1e6)
        for dx, dy in offsets:
            ann = ax.annotate(text, xy, fontsize=6.5, xytext=(dx, dy), textcoords="offset points",
                              ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                              arrowprops=dict(arrowstyle="-", lw=0.3, alpha=0.5)
                              if abs(dy) > 10 else None)
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(p) for p in placed) or (dx, dy) == offsets[-1]:
                placed.append(box)
                break
            ann.remove()
    if path:
        fig.savefig(path, format="png")
    return fig


# ------------------------------------------------------------------------------------------
# Command line.


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the CLI flags on ``fv`` (a private FlagValues in tests: no global flag clashes)."""
    flags.DEFINE_string("arch", None, "registered model name, e.g. vgg16", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "square input size (default 224; CIFAR nets 32)",
                         flag_values=fv)
    flags.DEFINE_integer("num_classes", None, "classifier width (default: the model's own)",
                         flag_values=fv)
    flags.DEFINE_enum("format", "table", list(analysis.FORMATS), "output format", flag_values=fv)
    flags.DEFINE_bool("xla", False, "also compile the forward pass and print XLA's FLOP count",
                      flag_values=fv)
    flags.DEFINE_bool("compare", False, "print the comparison table of the registered models",
                      flag_values=fv)
    flags.DEFINE_string("models", "*", "with --compare: shell pattern of model names",
                        flag_values=fv)
    flags.DEFINE_string("plot", None, "with --compare: write the comparison plot to this PNG",
                        flag_values=fv)


def run(fv: flags.FlagValues = flags.FLAGS) -> int:
    """Print what the parsed flags ask for; errors of use are one line on stderr, exit code 1."""
    try:
        if fv.compare:
            names = list_models(fv.models)
            if not names:
                raise ValueError(f"--models={fv.models!r} matches no model; valid names: "
                                 f"{', '.join(list_models())}")
            rows = compare_models(names, fv.image_size)
            print(format_comparison(rows, fv.format), end="")
            if fv.plot:
                sys.stdout.flush()
                plot_comparison(rows, fv.plot)
                print(f"wrote {fv.plot}", file=sys.stderr)
            return 0
        if not fv.arch:
            raise ValueError("give --arch=NAME (one of: " + ", ".join(list_models()) +
                             ") or --compare")
        if fv.image_size is not None and fv.image_size < 1:
            raise ValueError(f"--image_size must be positive, got {fv.image_size}")
        a = analyze_registered(fv.arch, fv.image_size, fv.num_classes)
        print(analysis.format_analysis(a, fv.format), end="")
        if fv.xla:
            model = create_model(fv.arch, num_classes=fv.num_classes)
            flops = analysis.xla_flops(model, a.input_shape)
            print(f"XLA cost analysis: {flops:,.0f} FLOPs = {flops / a.totals.flops:.3f} x "
                  f"(2 x MACs), {flops / (2 * a.totals.valid_macs):.3f} x "
                  f"(2 x MACs on non-padding taps)")
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: Sequence[str]) -> None:
    cli.setup(argv)
    sys.exit(run(flags.FLAGS))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
