"""cnn_jax against torchvision's same network in PyTorch on the same CPU (``--compare=torch``).

Both sides get the same network (torchvision's definition, same ``num_classes``, GoogLeNet without
auxiliary heads; parameter counts are checked to be equal), the same batch of random images and
labels, and the same work per step: train = forward in train mode (BN batch statistics, dropout),
softmax cross-entropy, backward and an SGD momentum-0.9 update (cnn_jax: today's jitted
``train_step`` with ``optax.sgd``; torch: ``torch.optim.SGD``); eval = forward in eval mode,
cross-entropy and top-5 (torch under ``eval()`` and ``torch.no_grad()``). torch runs channels-last
(its fast CPU layout). bfloat16: cnn_jax computes in bf16 with fp32 parameters (what
``--dtype=bfloat16`` trains with); torch's peer is the fp32 model under
``torch.autocast("cpu", dtype=torch.bfloat16)``.

The two are timed ALTERNATELY in one process (cnn_jax step, torch step, cnn_jax step, ...), so
machine noise and thermal state hit both alike; each side's number is the median step time after
the warm-up steps. ``ratio`` = torch step time / cnn_jax step time: above 1 cnn_jax is faster.
Both start from the same weights (torch's random init, converted by :mod:`cnn_jax.convert`)
and see the same batch.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

from cnn_jax import profiling
from cnn_jax.host import cpu_name

DTYPES = ("float32", "bfloat16")


class Row(NamedTuple):
    arch: str
    image_size: int
    batch_size: int
    num_classes: int = 1000


# Issue 10's rows: the landed ImageNet models at 224 px, and the default run's resnet18 at 32 px.
DEFAULT_ROWS = (Row("resnet50", 224, 16), Row("densenet121", 224, 16), Row("googlenet", 224, 16),
                Row("alexnet", 224, 16), Row("vgg16", 224, 8), Row("resnet18", 32, 64, 10))

# torchvision constructor arguments that make its network the one cnn_jax builds by default.
TORCH_KWARGS = {"googlenet": dict(aux_logits=False, transform_input=False, init_weights=True)}

INSTALL_HINT = ("--compare=torch needs torch and torchvision: pip install -e '.[torch]' && "
                "pip install --no-deps torchvision==0.28.0")


def import_torch():
    """``(torch, torchvision)``; a one-line ValueError saying how to install them if missing."""
    try:
        import torch
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    # torchvision's compiled operators (nms, ...) may not load against a CPU build of torch; its
    # model definitions do once ``register_fake`` (which only registers fake kernels of those
    # operators, unused here) is a no-op during the import.
    original = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    try:
        import torchvision
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    finally:
        torch.library.register_fake = original
    return torch, torchvision


def select_rows(archs: Sequence[str] = (), batch_size: Optional[int] = None,
                image_size: Optional[int] = None, num_classes: Optional[int] = None,
                dtypes: Sequence[str] = DTYPES) -> List[tuple]:
    """``(Row, dtype)`` pairs: the default rows (those of ``archs`` if given; an arch without a
    default row gets batch 16 at 224 px), with any given size overriding every row."""
    rows = list(DEFAULT_ROWS)
    if archs:
        known = {r.arch: r for r in rows}
        rows = [known.get(a, Row(a, 224, 16)) for a in archs]
    rows = [Row(r.arch, image_size or r.image_size, batch_size or r.batch_size,
                num_classes or r.num_classes) for r in rows]
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return [(r, d) for d in dtypes for r in rows]


# Seconds of sleep before each timed or traced call (alternate, profile_torch).
PAUSE_S = 0.02


def alternate(fns: Sequence[Callable[[], Any]], warmup: int, steps: int,
              pause_s: float = PAUSE_S,
              order: Optional[Callable[[int], Sequence[int]]] = None) -> List[List[float]]:
    """Seconds of each of ``steps`` calls of every fn, called in turn (a, b, a, b, ...) after
    ``warmup`` untimed rounds, each timed call after ``pause_s`` of sleep; each fn must return
    only when its work is done. ``order(r)``: the indices of ``fns`` in the order of round ``r``
    (warm-up and timed rounds each count from 0; default: as given). The pause is for the side
    that runs second: torch's OpenMP threads spin-wait for a while after each call, and a 9 ms
    XLA product (1x1 1024 -> 256 at 14x14, batch 16) took 14-16 ms right after a torch
    convolution against 8.7-8.9 ms after 10 ms of sleep (AMD AVX-512 host, 2026-12-06)."""
    order = order or (lambda r: range(len(fns)))
    for r in range(warmup):
        for i in order(r):
            fns[i]()
    times: List[List[float]] = [[] for _ in fns]
    for r in range(steps):
        for i in order(r):
            time.sleep(pause_s)
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return times


def state_from_torch(row: Row, dtype: str, torch_state_dict):
    """``(train state on the CPU, parameter count)``: the project's network of ``row``
    in ``dtype`` with the torch model's own weights (via :mod:`cnn_jax.convert`), so both sides
    start equal and no jitted random init has to compile."""
    import jax
    import jax.numpy as jnp
    import optax

    from cnn_jax import convert, train_step as step_lib
    from cnn_jax.models import count_params, create_model

    model = create_model(row.arch, num_classes=row.num_classes, dtype=jnp.dtype(dtype))
    variables = convert.from_torch_state_dict(row.arch, torch_state_dict, row.num_classes)
    tx = optax.sgd(0.01, momentum=0.9)
    create = jax.jit(lambda params, stats, rng: step_lib.TrainState.create(
        apply_fn=model.apply, params=params, tx=tx, batch_stats=stats, rng=rng))
    with jax.default_device(jax.devices("cpu")[0]):  # the comparison is on the CPU
        state = create(variables["params"], variables.get("batch_stats", {}),
                       jax.random.key_data(jax.random.key(0)))
    return state, count_params(variables["params"])


class CompiledSteps:
    """The project's train step (state donated) and eval step, compiled for ``state`` and
    ``batch`` on the device they are on, with their compile seconds and the train step's
    ``jax.stages.Lowered``."""

    def __init__(self, state, batch):
        import jax

        from cnn_jax import train_step as step_lib

        self._jax = jax
        self.state, self.batch = state, batch
        train = jax.jit(functools.partial(step_lib.train_step, label_smoothing=0.0),
                        donate_argnums=(0,))
        t0 = time.perf_counter()
        self.train_lowered = train.lower(self.state, self.batch)
        self._train = self.train_lowered.compile()
        self.train_compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._eval = jax.jit(step_lib.eval_step).lower(self.state, self.batch).compile()
        self.eval_compile_s = time.perf_counter() - t0

    def train(self) -> None:
        self.state, metrics = self._train(self.state, self.batch)
        self._jax.block_until_ready((self.state, metrics))

    def eval(self) -> None:
        self._jax.block_until_ready(self._eval(self.state, self.batch))


class _JaxSide(CompiledSteps):
    """The project's compiled train and eval steps on device-resident random data (CPU), from
    the torch model's own weights."""

    def __init__(self, row: Row, dtype: str, torch_state_dict, images, labels):
        import jax
        import jax.numpy as jnp
        import numpy as np

        state, self.params = state_from_torch(row, dtype, torch_state_dict)
        batch = {"image": np.asarray(images).astype(jnp.dtype(dtype)),
                 "label": np.asarray(labels)}
        super().__init__(*jax.device_put((state, batch), jax.devices("cpu")[0]))


class _TorchSide:
    """torchvision's network with the same train and eval step, channels-last, on the CPU."""

    def __init__(self, torch, torchvision, row: Row, dtype: str, images, labels):
        self.torch = torch
        torch.manual_seed(0)
        try:
            model = torchvision.models.get_model(row.arch, weights=None,
                                                 num_classes=row.num_classes,
                                                 **TORCH_KWARGS.get(row.arch, {}))
        except ValueError:
            raise ValueError(f"torchvision has no model {row.arch!r} to compare with; pick a "
                             f"model both have, e.g. {', '.join(r.arch for r in DEFAULT_ROWS)}"
                             ) from None
        self.params = sum(p.numel() for p in model.parameters())
        self.model = model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        # NHWC memory seen as NCHW is channels-last already (contiguous() then copies nothing).
        self.x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
        self.y = torch.from_numpy(labels).long()
        self.k = min(5, row.num_classes)
        self.autocast = dtype == "bfloat16"

    def _cast(self):
        return self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.autocast)

    def train(self) -> None:
        F = self.torch.nn.functional
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._cast():
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
        loss.backward()
        self.optimizer.step()
        float(loss.detach())

    def eval(self) -> None:
        F = self.torch.nn.functional
        self.model.eval()
        with self.torch.no_grad(), self._cast():
            logits = self.model(self.x).float()
            loss = F.cross_entropy(logits, self.y, reduction="sum")
            top = logits.topk(self.k, dim=-1).indices
            hits = (top == self.y[:, None]).any(-1).sum()
        float(loss), int(hits)


def profile_torch(torch, step: Callable[[], Any], steps: int,
                  pause_s: float = PAUSE_S) -> Dict[str, Any]:
    """``steps`` calls of ``step`` under ``torch.profiler``, each after ``pause_s`` of sleep (as
    :func:`alternate`): each aten op's own CPU time (the calling thread's wall time, its
    intra-op threads inside), summarized as :func:`cnn_jax.profiling.summarize` does XLA's ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            time.sleep(pause_s)
            step()
    times = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    return profiling.summarize(times, steps, source="trace of torch.profiler")


def compare_row(row: Row, dtype: str, steps: int = 5, warmup: int = 2,
                profile: int = 0) -> Dict[str, Any]:
    """Alternate cnn_jax's and torch's train steps, then their eval steps; medians and ratios.
    ``profile``: then trace that many more train steps of each side, into ``result["profile"]``
    (where each side's step spends its time: XLA's ops and torch's aten ops)."""
    import numpy as np

    torch, torchvision = import_torch()
    rng = np.random.default_rng(1)  # the same batch for both
    images = rng.standard_normal((row.batch_size, row.image_size, row.image_size, 3), np.float32)
    labels = rng.integers(0, row.num_classes, row.batch_size).astype(np.int32)
    torch_side = _TorchSide(torch, torchvision, row, dtype, images, labels)
    jax_side = _JaxSide(row, dtype, torch_side.model.state_dict(), images, labels)
    if jax_side.params != torch_side.params:
        raise ValueError(f"{row.arch}: cnn_jax has {jax_side.params:,} parameters, torchvision "
                         f"{torch_side.params:,}; the networks differ, so the timing would not "
                         f"compare like with like")
    result: Dict[str, Any] = {"arch": row.arch, "image_size": row.image_size,
                              "batch_size": row.batch_size, "num_classes": row.num_classes,
                              "dtype": dtype, "params": jax_side.params,
                              "torch_peer": ("fp32 model under torch.autocast('cpu', bfloat16)"
                                             if dtype == "bfloat16" else "fp32"),
                              "steps": steps, "warmup": warmup,
                              # others' work on the machine shows up in both sides' times
                              "load_average_1min": os.getloadavg()[0]}
    for kind in ("train", "eval"):
        jax_t, torch_t = alternate([getattr(jax_side, kind), getattr(torch_side, kind)],
                                   warmup, steps)
        jax_s, torch_s = statistics.median(jax_t), statistics.median(torch_t)
        result[kind] = {
            "cnn_jax_ms": 1e3 * jax_s, "torch_ms": 1e3 * torch_s,
            "cnn_jax_images_per_sec": row.batch_size / jax_s,
            "torch_images_per_sec": row.batch_size / torch_s,
            "ratio": torch_s / jax_s,
            "faster": "cnn_jax" if jax_s < torch_s else "torch",
            "cnn_jax_compile_s": getattr(jax_side, f"{kind}_compile_s"),
            "cnn_jax_step_ms": [1e3 * t for t in jax_t],
            "torch_step_ms": [1e3 * t for t in torch_t],
        }
    if profile:
        # cnn_jax's steps first: once torch.profiler has run in the process, XLA's traced steps
        # take 10-30% longer than its timed ones (resnet50: 3.2-3.3 s of ops a step against
        # 2.5 s traced first, 2.6 s timed), while torch's traced after XLA's are level with its
        # timed steps (2.4 against 2.5 s; session 44, 2026-12-07).
        time.sleep(PAUSE_S)
        summary, (jax_side.state, _) = profiling.profile_steps(
            jax_side._train, (jax_side.state, jax_side.batch), profile, carry=True)
        torch_summary = profile_torch(torch, torch_side.train, profile)
        result["profile"] = {"cnn_jax": summary, "torch": torch_summary}
    return result


def environment() -> Dict[str, Any]:
    """Versions, threads and CPU: what a reader needs to reproduce a table."""
    import jax

    torch, torchvision = import_torch()
    return {"jax": jax.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "processor": cpu_name()}


def run_compare(rows: Sequence[tuple], steps: int = 5, warmup: int = 2, torch_threads: int = 0,
                progress: Optional[Callable[[str], None]] = None,
                profile: int = 0) -> Dict[str, Any]:
    """Every ``(Row, dtype)`` of ``rows``, one after another; one dict with all the numbers.

    ``torch_threads``: torch's intra-op threads (0: torch's default, one per physical core);
    ``profile``: trace that many train steps of each side after each row's timing.
    """
    if steps < 1 or warmup < 0 or profile < 0:
        raise ValueError(f"need --steps >= 1, --warmup >= 0 and --profile >= 0, got {steps}, "
                         f"{warmup} and {profile}")
    if torch_threads:
        torch, _ = import_torch()
        torch.set_num_threads(torch_threads)
    out = {"environment": environment(), "rows": []}
    for row, dtype in rows:
        r = compare_row(row, dtype, steps, warmup, profile)
        out["rows"].append(r)
        if progress:
            progress(_progress_line(r))
    return out


def _faster(ratio: float) -> str:
    return f"cnn_jax {ratio:.2f}x" if ratio >= 1 else f"torch {1 / ratio:.2f}x"


def _progress_line(r: Dict[str, Any]) -> str:
    t, e = r["train"], r["eval"]
    return (f"{r['arch']} {r['image_size']}px b{r['batch_size']} {r['dtype']}: train "
            f"{t['cnn_jax_images_per_sec']:.1f} vs {t['torch_images_per_sec']:.1f} img/s "
            f"(ratio {t['ratio']:.2f}, {_faster(t['ratio'])} faster), eval "
            f"{e['cnn_jax_images_per_sec']:.1f} vs {e['torch_images_per_sec']:.1f} img/s "
            f"(ratio {e['ratio']:.2f})")


def markdown(result: Dict[str, Any]) -> str:
    """The README table: img/s of both sides, ratio (torch time / cnn_jax time) and who wins."""
    env = result["environment"]
    steps = {(r["steps"], r["warmup"]) for r in result["rows"]}
    lines = [f"cnn_jax (jax {env['jax']}, XLA:CPU) vs torch {env['torch']} (torchvision "
             f"{env['torchvision']}, {env['torch_threads']} threads, channels-last), "
             f"{env['processor']}, {env['cpu_count']} CPUs (1-min load average up to "
             f"{max([r['load_average_1min'] for r in result['rows']], default=0):.1f}); "
             f"median step of "
             + ", ".join(f"{s} after {w} warm-up" for s, w in sorted(steps))
             + ", alternating; ratio = torch step time / cnn_jax step time (> 1: cnn_jax faster)."
             " bfloat16: cnn_jax bf16 compute with fp32 params vs torch fp32 under CPU autocast.",
             "",
             "| model | input | batch | dtype | train img/s cnn_jax | train img/s torch | "
             "train ratio | faster (train) | eval img/s cnn_jax | eval img/s torch | eval ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t, e = r["train"], r["eval"]
        classes = "" if r["num_classes"] == 1000 else f" ({r['num_classes']} classes)"
        lines.append(
            f"| {r['arch']}{classes} | {r['image_size']} | {r['batch_size']} | {r['dtype']} | "
            f"{t['cnn_jax_images_per_sec']:.2f} | {t['torch_images_per_sec']:.2f} | "
            f"**{t['ratio']:.2f}** | {_faster(t['ratio'])} | "
            f"{e['cnn_jax_images_per_sec']:.2f} | {e['torch_images_per_sec']:.2f} | "
            f"{e['ratio']:.2f} |")
    for r in result["rows"]:
        if "profile" in r:
            name = f"{r['arch']} {r['image_size']} px batch {r['batch_size']} {r['dtype']}"
            lines += ["", profiling.markdown(r["profile"]["cnn_jax"],
                                             f"{name}, cnn_jax train step"),
                      "", profiling.markdown(r["profile"]["torch"], f"{name}, torch train step",
                                             ops="torch ops' own CPU time")]
    return "\n".join(lines)
