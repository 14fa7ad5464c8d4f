"""Shared machinery of the ablation experiments: flags, training runs, CSV/PNG/markdown output.

An experiment is a list of :class:`Variant` (a registered architecture plus model and config
overrides) trained with one recipe through :func:`cnn_jax.train_lib.train_and_evaluate`, the same
code path as ``python -m cnn_jax.train``; the curves come from each run's ``metrics.jsonl``.
Results go to ``experiments/results/<name>/``: ``summary.csv`` (one row per variant),
``curves.csv`` (every logged train/eval point), ``<name>.png`` and ``README.md`` (the command,
the setup, the numbers and what they do and do not show).

The default recipe (4 epochs of AdamW on a 2,000-image subset of the built-in ``shapes`` dataset)
is sized for a 2-core CPU, minutes per experiment; ``--dataset``, ``--epochs``, ``--batch_size``,
``--image_size``, ``--optimizer``, ``--learning_rate`` scale it to CIFAR/ImageNet on
accelerators. ``--smoke`` runs the same code end to end on a tiny dataset and tiny networks in
seconds (the tests use it).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import types
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

# TensorFlow (imported later, by the input pipeline) reads this when it loads: its INFO is noise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_ROOT = os.path.join(REPO_ROOT, "experiments", "results")

# The default recipe of every experiment (each may change some values): a 2,000/500-image subset
# of `shapes` at 32 px, 4 epochs at batch 32 with a cosine schedule. AdamW because in ~250 steps
# it gets much further than SGD (measured on resnet20 here: ~60% vs ~40% val top-1 after 300
# steps); the flags give the papers' SGD recipes for long runs. No augmentation: in a run this
# short, random crops only slow learning down.
DEFAULTS: Dict[str, Any] = dict(
    dataset="shapes/32px_n2000_v500", data_dir=None, image_size=32, epochs=4.0, batch_size=32,
    learning_rate=3e-3, optimizer="adamw", weight_decay=1e-4, warmup_epochs=0.25,
    grad_clip_norm=5.0, augment="none", evals_per_epoch=2, logs_per_epoch=10, seed=0)
# --smoke: the tiny dataset (generated in about a second) and a one-epoch run.
SMOKE: Dict[str, Any] = dict(dataset="shapes/{image_size}px_n96_v32", epochs=1.0, batch_size=16,
                             evals_per_epoch=2, logs_per_epoch=3)


# ------------------------------------------------------------------------------------ flags


Args = types.SimpleNamespace  # the parsed flags of one experiment run


class _TupleParser(flags.ArgumentParser):
    """``"8,16,32"`` -> ``(8, 16, 32)`` (``item=int``) or ``("a", "b")`` (``item=str``)."""

    def __init__(self, item: Callable[[str], Any]):
        super().__init__()
        self.item = item

    def parse(self, argument: Any) -> Tuple[Any, ...]:
        if not isinstance(argument, str):
            return tuple(argument)
        return int_tuple(argument) if self.item is int else str_tuple(argument)

    def flag_type(self) -> str:
        return "comma-separated list"


def define_tuple(fv: flags.FlagValues, name: str, default: Optional[Sequence[Any]], help: str,
                 item: Callable[[str], Any] = str) -> None:
    """A ``--name=a,b,c`` flag whose value is a tuple (of ints with ``item=int``)."""
    flags.DEFINE(_TupleParser(item), name, None if default is None else ",".join(map(str, default)),
                 help, flag_values=fv, serializer=flags.CsvListSerializer(","))


class ExperimentFlags(flags.FlagValues):
    """The flags of one experiment, with its command name and description (for --help)."""

    def __init__(self, prog: str, description: str):
        super().__init__()
        # FlagValues turns attribute assignment into flag assignment; these are not flags.
        self.__dict__["prog"], self.__dict__["description"] = prog, description


def make_parser(name: str, description: str) -> ExperimentFlags:
    """The absl flags every experiment shares, on a FlagValues of its own (defaults resolved by
    :func:`parse`); an experiment's ``add_flags(fv)`` defines its own on it."""
    fv = ExperimentFlags(f"experiments.{name}", description)
    flags.DEFINE_string("dataset", None, f"TFDS dataset, e.g. cifar10, imagenet2012 or a `shapes` "
                        f"config (default {DEFAULTS['dataset']})", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data_dir (default $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets)", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "square training resolution", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("epochs", None, "training epochs per variant", lower_bound=0,
                       flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "global batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("learning_rate", None, "peak learning rate (not batch-scaled)",
                       flag_values=fv)
    flags.DEFINE_enum("optimizer", None, ["sgd", "nesterov", "adamw", "lars"], "optimizer",
                      flag_values=fv)
    flags.DEFINE_float("weight_decay", None, "weight decay", lower_bound=0, flag_values=fv)
    flags.DEFINE_float("warmup_epochs", None, "linear warmup before the cosine decay",
                       lower_bound=0, flag_values=fv)
    flags.DEFINE_float("grad_clip_norm", None, "global gradient clipping (0 = off)",
                       lower_bound=0, flag_values=fv)
    flags.DEFINE_string("augment", None, "augmentation: 'none', '' (the dataset's default random "
                        "crops and flips), a preset (inception, vgg, alexnet) or field=value items",
                        flag_values=fv)
    flags.DEFINE_integer("evals_per_epoch", None, "validation points per epoch", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("logs_per_epoch", None, "training-curve points per epoch",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", None, "random seed", flag_values=fv)
    flags.DEFINE_string("variants", "", "comma-separated subset of variant labels",
                        flag_values=fv)
    flags.DEFINE_string("out", None, f"results folder (default experiments/results/{name})",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "keep each run's checkpoints and metrics.jsonl under "
                        "this folder (a re-run resumes them); default: a temporary folder, "
                        "deleted afterwards", flag_values=fv)
    flags.DEFINE_bool("smoke", False, "tiny dataset and networks, one epoch: checks the pipeline "
                      "in seconds", flag_values=fv)
    return fv


def parse(parser: ExperimentFlags, argv: Optional[Sequence[str]],
          defaults: Mapping[str, Any] = (), smoke: Mapping[str, Any] = ()) -> Args:
    """Parse ``argv``; unset flags take the experiment's (or --smoke's) value, then DEFAULTS.

    A bad flag is a one-line ``error: ...`` (SystemExit), as in every cnn_jax command.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(f"usage: python -m {parser.prog} [flags]\n\n{parser.description}\n\n"
              f"{parser.get_help()}")
        raise SystemExit(0)
    try:
        extra = parser([parser.prog, *argv])
    except flags.Error as e:
        raise SystemExit(f"error: {str(e).strip().splitlines()[0]}") from None
    if len(extra) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(extra[1:])}")
    args = Args(**{name: parser[name].value for name in parser})
    values = {**DEFAULTS, **dict(defaults)}
    if args.smoke:
        values.update(SMOKE)
        values.update(dict(smoke))
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if "{" in args.dataset:  # the smoke dataset follows the image size
        args.dataset = args.dataset.format(image_size=args.image_size)
    args.argv = argv
    args.cpu_start = time.process_time()
    args.selected = [v.strip() for v in args.variants.split(",") if v.strip()]
    return args


def int_tuple(text: str) -> Tuple[int, ...]:
    """``"8,16,32"`` -> ``(8, 16, 32)``."""
    try:
        return tuple(int(v) for v in text.replace(" ", "").strip("()").split(",") if v)
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def str_tuple(text: str) -> Tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def command_line(name: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run, as typed in the repository root."""
    return " ".join(["python", "-m", f"experiments.{name}", *map(shlex.quote, argv)])


def select(variants: Sequence["Variant"], labels: Sequence[str]) -> List["Variant"]:
    """The variants named in ``--variants`` (all when empty); unknown labels are an error."""
    if not labels:
        return list(variants)
    known = [v.label for v in variants]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [v for v in variants if v.label in labels]


# ------------------------------------------------------------------------------------ runs


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of an experiment: a registered model plus overrides."""

    label: str
    arch: str
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # training-config fields


@dataclasses.dataclass
class Run:
    """What one variant's training produced."""

    variant: Variant
    params: int
    macs: int
    records: List[Dict[str, Any]]  # metrics.jsonl records (split 'train' or 'eval')
    steps_per_epoch: int
    wall_seconds: float
    error: str = ""  # e.g. divergence; the records stop there
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.variant.label

    def split(self, name: str) -> List[Dict[str, Any]]:
        return [r for r in self.records if r.get("split") == name]

    def final_eval(self) -> Dict[str, Any]:
        evals = self.split("eval")
        return evals[-1] if evals else {}

    def best_top1(self) -> float:
        return max((_num(r.get("top1")) for r in self.split("eval")), default=math.nan)

    def last_epoch_train(self, key: str) -> float:
        """Mean of a training metric over the last epoch's logged points (the noise averages)."""
        train = self.split("train")
        if not train:
            return math.nan
        last = _num(train[-1].get("epoch"))
        values = [_num(r.get(key)) for r in train if _num(r.get("epoch")) > last - 1.0 + 1e-9]
        return float(sum(values) / len(values))


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def dataset_info(args: Args):
    from cnn_jax import input_pipeline

    return input_pipeline.get_dataset_info(args.dataset, args.data_dir, image_size=args.image_size)


def training_config(variant: Variant, args: Args, steps_per_epoch: int):
    """The training config of one variant: the dataset's recipe with the experiment's recipe."""
    from cnn_jax import configs

    config = configs.load(configs.recipe_path(variant.arch, args.dataset), variant.arch)
    config.arch = variant.arch
    config.dataset = args.dataset
    config.data_dir = args.data_dir or ""
    config.image_size = args.image_size
    config.num_epochs = float(args.epochs)
    config.num_train_steps = -1
    config.batch_size = args.batch_size
    # Bigger eval batches are faster; they must still split evenly over the devices.
    import jax

    eval_batch = max(args.batch_size, 100)
    config.eval_batch_size = eval_batch if eval_batch % jax.device_count() == 0 else 0
    config.learning_rate = args.learning_rate
    config.lr_reference_batch_size = 0  # --learning_rate is the peak rate as given
    config.optimizer = args.optimizer
    config.weight_decay = args.weight_decay
    config.lr_schedule = "cosine"
    # A warmup as long as the run leaves the cosine no steps (optax raises): cap it.
    config.warmup_epochs = min(float(args.warmup_epochs), float(args.epochs) / 4)
    config.grad_clip_norm = args.grad_clip_norm
    config.augment = args.augment
    config.seed = args.seed
    config.eval_every_steps = max(1, steps_per_epoch // max(1, args.evals_per_epoch))
    config.log_every_steps = max(1, steps_per_epoch // max(1, args.logs_per_epoch))
    config.keep_checkpoints = 1
    config.async_checkpointing = False
    config.progress_bar = False
    config.model = configs.model_config(variant.model_kwargs)
    for key, value in variant.config.items():
        setattr(config, key, value)
    return config


def model_cost(arch: str, model_kwargs: Mapping[str, Any], num_classes: int,
               image_size: int) -> Tuple[int, int]:
    """(trainable parameters, multiply-accumulates per image) by cnn_jax.analysis (no compute)."""
    from cnn_jax.models import create_model

    model = create_model(arch, num_classes=num_classes, **dict(model_kwargs))
    return module_cost(model, image_size)


def param_count(arch: str, model_kwargs: Mapping[str, Any], num_classes: int,
                image_size: int) -> int:
    """Trainable parameters of a registered model (abstract init: no compute)."""
    from cnn_jax.models import abstract_variables, count_params, create_model

    model = create_model(arch, num_classes=num_classes, **dict(model_kwargs))
    return count_params(abstract_variables(model, image_size)["params"])


def module_cost(model, image_size: int) -> Tuple[int, int]:
    """(trainable parameters, MACs per image) of any Flax module on a square RGB image."""
    from cnn_jax import analysis

    totals = analysis.analyze(model, (1, image_size, image_size, 3)).totals
    return totals.params, totals.macs


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


class Workdirs:
    """Per-variant training folders: under ``--workdir`` (kept) or a temporary folder (deleted)."""

    def __init__(self, root: Optional[str]):
        self.keep = bool(root)
        self.root = os.path.abspath(root) if root else tempfile.mkdtemp(prefix="cnn_jax_exp_")

    def path(self, label: str) -> str:
        return os.path.join(self.root, slug(label))

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def train_variant(variant: Variant, args: Args, workdir: str, info=None) -> Run:
    """Train one variant with cnn_jax.train_lib; a diverging run is recorded, not raised."""
    from cnn_jax import metrics as metrics_lib
    from cnn_jax import optim, train_lib

    info = info or dataset_info(args)
    steps_per_epoch = optim.steps_per_epoch(info.num_train_examples, args.batch_size)
    config = training_config(variant, args, steps_per_epoch)
    params, macs = model_cost(variant.arch, variant.model_kwargs, info.num_classes,
                              args.image_size)
    print(f"--- {variant.label}: {variant.arch} {dict(variant.model_kwargs) or ''} "
          f"({params:,} parameters, {macs / 1e6:.1f}M MACs/image)", file=sys.stderr, flush=True)
    start = time.time()
    error = ""
    try:
        train_lib.train_and_evaluate(config, workdir)
    except train_lib.NonFiniteLossError as e:
        error = "diverged: " + str(e).split(";")[0]
        print(f"{variant.label}: {error}", file=sys.stderr, flush=True)
    return Run(variant, params, macs, metrics_lib.read_metrics(workdir), steps_per_epoch,
               time.time() - start, error)


def run_variants(variants: Sequence[Variant], args: Args) -> List[Run]:
    """Train every variant in turn (each in its own workdir)."""
    info = dataset_info(args)
    dirs = Workdirs(args.workdir)
    try:
        return [train_variant(v, args, dirs.path(v.label), info) for v in variants]
    finally:
        dirs.close()


# ------------------------------------------------------------------------------------ output

CURVE_COLUMNS = ("variant", "split", "step", "epoch", "loss", "accuracy", "top1", "top5",
                 "grad_norm", "learning_rate")
SUMMARY_COLUMNS = ("variant", "arch", "model_kwargs", "params", "macs", "steps",
                   "train_loss_last_epoch", "train_acc_last_epoch", "val_loss", "val_top1",
                   "best_val_top1", "wall_seconds", "status")


def curve_rows(runs: Sequence[Run]) -> List[Dict[str, Any]]:
    rows = []
    for run in runs:
        for r in run.records:
            if r.get("split") not in ("train", "eval"):
                continue
            row = {k: r.get(k, "") for k in CURVE_COLUMNS}
            row["variant"] = run.label
            row["epoch"] = r.get("epoch", r["step"] / run.steps_per_epoch)
            rows.append(row)
    return rows


def summary_row(run: Run) -> Dict[str, Any]:
    final = run.final_eval()
    steps = max((int(r["step"]) for r in run.records), default=0)
    return {
        "variant": run.label, "arch": run.variant.arch,
        "model_kwargs": " ".join(f"{k}={v}" for k, v in run.variant.model_kwargs.items()),
        "params": run.params, "macs": run.macs, "steps": steps,
        "train_loss_last_epoch": _round(run.last_epoch_train("loss")),
        "train_acc_last_epoch": _round(run.last_epoch_train("accuracy")),
        "val_loss": _round(_num(final.get("loss"))), "val_top1": _round(_num(final.get("top1"))),
        "best_val_top1": _round(run.best_top1()), "wall_seconds": round(run.wall_seconds),
        "status": run.error or "ok",
    }


def _round(x: float, digits: int = 4) -> Any:
    return "" if x is None or not math.isfinite(x) else round(x, digits)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]],
              columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else ()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt_cell(row.get(k, "")) for k in columns})
    return path


def _fmt_cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def new_figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.8):
    """A bare matplotlib Figure on the Agg canvas (headless; leaves pyplot's state alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    return fig, axes


def plot_curve_axes(axes, runs: Sequence[Run],
                    style: Optional[Callable[[int, Run], Dict[str, Any]]] = None) -> None:
    """Training loss, validation loss and validation top-1 against epochs on three axes.

    ``style(i, run)`` gives each run's line properties (default: colour ``C<i>``, solid).
    """
    ax_train, ax_val_loss, ax_top1 = axes
    for i, run in enumerate(runs):
        props = {"color": f"C{i % 10}", "lw": 1.3, **(style(i, run) if style else {})}
        spe = run.steps_per_epoch
        train = [r for r in run.split("train") if math.isfinite(_num(r.get("loss")))]
        evals = run.split("eval")
        label = run.label + (" (diverged)" if run.error else "")
        ax_train.plot([r["step"] / spe for r in train], [_num(r["loss"]) for r in train],
                      label=label, **props)
        ax_val_loss.plot([r["step"] / spe for r in evals], [_num(r["loss"]) for r in evals],
                         marker="o", ms=3, label=label, **props)
        ax_top1.plot([r["step"] / spe for r in evals], [100 * _num(r["top1"]) for r in evals],
                     marker="o", ms=3, label=label, **props)
    for ax, title in ((ax_train, "training loss (train mode, per logging interval)"),
                      (ax_val_loss, "validation loss"), (ax_top1, "validation top-1 (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    # Log scale: early batch-norm statistics can make one eval's loss 10x the others.
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (ax_train, ax_val_loss):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax_top1.legend(fontsize=8)


def plot_curves(path: str, runs: Sequence[Run], title: str) -> str:
    fig, axes = new_figure(3)
    plot_curve_axes(axes, runs)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats in [0, 1] under 'top-1'/'acc' become percents."""
    def cell(key: str, v: Any) -> str:
        if v == "" or v is None:
            return "-"
        if key in ("params", "macs") and isinstance(v, (int, float)):
            return f"{v:,.0f}" if key == "params" else f"{v / 1e6:,.1f}M"
        if ("top1" in key or "acc" in key) and isinstance(v, (int, float)):
            return f"{100 * v:.1f}%"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(k, row.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


SUMMARY_TABLE = (("variant", "variant"), ("params", "params"), ("macs", "MACs/image"),
                 ("steps", "steps"), ("train_loss_last_epoch", "train loss (last epoch)"),
                 ("train_acc_last_epoch", "train acc (last epoch)"), ("val_loss", "val loss"),
                 ("val_top1", "val top-1"), ("best_val_top1", "best val top-1"),
                 ("wall_seconds", "wall s"), ("status", "status"))


def setup_lines(args: Args, info=None) -> List[str]:
    """The recipe, as markdown bullet points."""
    import jax

    info = info or dataset_info(args)
    lines = [
        f"- data: `{args.dataset}` ({info.num_train_examples:,} train / "
        f"{info.num_eval_examples:,} validation images, {info.num_classes} classes) at "
        f"{args.image_size}x{args.image_size}, augmentation `{args.augment or 'dataset default'}`",
        f"- training: {args.epochs:g} epochs, batch {args.batch_size}, {args.optimizer}"
        f"{' (momentum 0.9)' if args.optimizer in ('sgd', 'nesterov', 'lars') else ''} peak lr "
        f"{args.learning_rate:g} with {min(args.warmup_epochs, args.epochs / 4):g}-epoch warmup "
        f"and cosine decay, weight decay {args.weight_decay:g}, gradient clipping "
        f"{args.grad_clip_norm:g}, seed {args.seed}; one run per variant",
        f"- machine: JAX {jax.__version__} on {jax.default_backend()} "
        f"({jax.device_count()} device(s), {os.cpu_count()} CPU cores)",
    ]
    return lines


def write_markdown(path: str, *, title: str, intro: str, command: str, setup: Sequence[str],
                   tables: Sequence[Tuple[str, str]], observations: Sequence[str],
                   caveats: Sequence[str], images: Sequence[str], seconds: float,
                   cpu_seconds: Optional[float] = None) -> str:
    """The summary: command, setup, numbers, what the numbers show, and what they cannot."""
    parts = [f"# {title}", "", intro.strip(), "", "Produced by (from the repository root):", "",
             "```bash", command, "```", "",
             f"Total wall time: {seconds / 60:.1f} min"
             + (f" (CPU time of the process: {cpu_seconds / 60:.1f} min)." if cpu_seconds
                else "."), "",
             "## Setup", "", *setup, ""]
    parts += ["## Results", ""]
    for heading, table in tables:
        if heading:
            parts += [f"**{heading}**", ""]
        parts += [table, ""]
    for image in images:
        parts += [f"![{os.path.splitext(image)[0]}]({image})", ""]
    if observations:
        parts += ["## What these numbers show", ""] + [f"- {o}" for o in observations] + [""]
    if caveats:
        parts += ["## What they do not show", ""] + [f"- {c}" for c in caveats] + [""]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "n/a"


def write_standard_results(name: str, args: Args, runs: Sequence[Run], *,
                           title: str, intro: str, observations: Sequence[str],
                           caveats: Sequence[str], seconds: float,
                           extra_tables: Sequence[Tuple[str, str]] = (),
                           plot: Optional[Callable[[str], Any]] = None,
                           setup_extra: Sequence[str] = ()) -> Dict[str, str]:
    """summary.csv, curves.csv, <name>.png and README.md in the results folder."""
    out = args.out or os.path.join(RESULTS_ROOT, name)
    os.makedirs(out, exist_ok=True)
    summary = [summary_row(r) for r in runs]
    paths = {
        "summary": write_csv(os.path.join(out, "summary.csv"), summary, SUMMARY_COLUMNS),
        "curves": write_csv(os.path.join(out, "curves.csv"), curve_rows(runs), CURVE_COLUMNS),
    }
    png = os.path.join(out, f"{name}.png")
    if plot is not None:
        plot(png)
    else:
        plot_curves(png, runs, title)
    paths["plot"] = png
    tables = [("", markdown_table(summary, SUMMARY_TABLE)), *extra_tables]
    paths["markdown"] = write_markdown(
        os.path.join(out, "README.md"), title=title, intro=intro,
        command=command_line(name, args.argv), setup=[*setup_lines(args), *setup_extra],
        tables=tables,
        observations=observations, caveats=caveats, images=[os.path.basename(png)],
        seconds=seconds, cpu_seconds=time.process_time() - getattr(args, "cpu_start", 0.0))
    print(f"wrote {', '.join(sorted(os.path.relpath(p) for p in paths.values()))}",
          file=sys.stderr, flush=True)
    return paths


# ------------------------------------------------------------------------------------ helpers

CIFAR_WIDTHS = (8, 16, 32)  # half the paper's 16-32-64: four times cheaper, same depth
SMOKE_WIDTHS = (4, 8, 8)


def add_widths_flag(fv: flags.FlagValues) -> None:
    define_tuple(fv, "widths", None, "filters of the three CIFAR stages (paper: 16,32,64; "
                 f"default {','.join(map(str, CIFAR_WIDTHS))})", item=int)


def cifar_kwargs(args: Args) -> Dict[str, Any]:
    """Model overrides of the CIFAR ResNets: ``--widths``, and one block per stage in --smoke."""
    widths = tuple(args.widths) if args.widths else (SMOKE_WIDTHS if args.smoke else CIFAR_WIDTHS)
    kwargs: Dict[str, Any] = {"widths": widths}
    if args.smoke:
        kwargs["stage_sizes"] = (1, 1, 1)
    return kwargs


def top1(run: Run) -> float:
    return _num(run.final_eval().get("top1"))


def significance_note(runs: Sequence[Run], num_eval: int) -> str:
    """How large a top-1 difference has to be before it means anything (binomial noise)."""
    accs = [top1(r) for r in runs if math.isfinite(top1(r))]
    if len(accs) < 2 or num_eval <= 0:
        return ""
    p = min(max(sum(accs) / len(accs), 0.05), 0.95)
    se_diff = math.sqrt(2 * p * (1 - p) / num_eval)
    spread = max(accs) - min(accs)
    return (f"The validation top-1 values span {100 * spread:.1f} points; with {num_eval} "
            f"validation images one run's difference has a standard error of about "
            f"{100 * se_diff:.1f} points, so gaps below ~{200 * se_diff:.0f} points are within "
            f"noise (one seed per variant; seed-to-seed variation adds to this).")


def ranking_notes(runs: Sequence[Run]) -> List[str]:
    """Variants ordered by last-epoch training loss and by final validation top-1."""
    ok = [r for r in runs if math.isfinite(r.last_epoch_train("loss"))]
    notes = []
    if ok:
        by_loss = sorted(ok, key=lambda r: r.last_epoch_train("loss"))
        notes.append("Last-epoch training loss, lowest first: " + ", ".join(
            f"{r.label} {r.last_epoch_train('loss'):.3f}" for r in by_loss) + ".")
    evals = [r for r in runs if math.isfinite(top1(r))]
    if evals:
        by_top1 = sorted(evals, key=top1, reverse=True)
        notes.append("Final validation top-1, highest first: " + ", ".join(
            f"{r.label} {pct(top1(r))}" for r in by_top1) + ".")
    for r in runs:
        if r.error:
            notes.append(f"{r.label} {r.error} (its curves stop there).")
    return notes


def run_standard(name: str, argv: Optional[Sequence[str]], *, title: str, intro: str,
                 caveats: Sequence[str],
                 build_variants: Callable[[Args], List[Variant]],
                 observe: Callable[[Sequence[Run], Args, Any], List[str]],
                 add_flags: Optional[Callable[[flags.FlagValues], None]] = None,
                 defaults: Mapping[str, Any] = (), smoke: Mapping[str, Any] = (),
                 extra_tables: Optional[Callable[[Sequence[Run]], List[Tuple[str, str]]]] = None,
                 description: str = "") -> int:
    """The whole of a train-and-compare experiment: flags, runs, results."""
    quiet_logs()
    parser = make_parser(name, description or title)
    if add_flags:
        add_flags(parser)
    args = parse(parser, argv, defaults, smoke)
    start = time.time()
    variants = select(build_variants(args), args.selected)
    info = dataset_info(args)
    runs = run_variants(variants, args)
    observations = [*observe(runs, args, info), significance_note(runs, info.num_eval_examples)]
    write_standard_results(name, args, runs, title=title, intro=intro,
                           observations=[n for n in observations if n], caveats=caveats,
                           seconds=time.time() - start,
                           extra_tables=extra_tables(runs) if extra_tables else ())
    return 0


def run_experiment(module_name: str, argv: Optional[Sequence[str]], **kwargs) -> int:
    """:func:`run_standard` with an experiment module's NAME, TITLE, INTRO, CAVEATS,
    ``build_variants``, ``observe``, ``add_flags`` and the first line of its docstring."""
    m = sys.modules[module_name]
    return run_standard(m.NAME, argv, title=m.TITLE, intro=m.INTRO, caveats=m.CAVEATS,
                        build_variants=m.build_variants, observe=m.observe,
                        add_flags=getattr(m, "add_flags", None),
                        description=m.__doc__.splitlines()[0], **kwargs)


def quiet_logs() -> None:
    """Keep absl/TFDS INFO and WARNING chatter (custom shapes configs) out of the output."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)
