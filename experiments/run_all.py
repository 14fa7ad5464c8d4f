"""Run every experiment (or some) in one process: ``python -m experiments.run_all [--smoke]``.

Other flags are passed to every experiment, e.g.
``python -m experiments.run_all --only=degradation,shortcuts --epochs=5``. With ``--out_root``
each experiment writes to ``<out_root>/<name>`` instead of ``experiments/results/<name>``, and a
``status.json`` there records each one's outcome and time. A failing experiment does not stop the
others; the exit code is 1 if any failed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

EXPERIMENTS = ("degradation", "bn_placement", "shortcuts", "activations", "alexnet_ablation",
               "resnet_vs_densenet")


def main(argv: Optional[Sequence[str]] = None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("only", "", "comma-separated experiment names", flag_values=fv)
    flags.DEFINE_string("out_root", None, "write <out_root>/<name>/ instead", flag_values=fv)
    argv = ["experiments.run_all", *(sys.argv[1:] if argv is None else argv)]
    if "--help" in argv or "-h" in argv:
        print(f"usage: python -m experiments.run_all [flags] [any experiment's flags]\n\n"
              f"{fv.get_help()}")
        return 0
    try:
        rest = fv(argv, known_only=True)[1:]  # the experiments' own flags
    except flags.Error as e:
        raise SystemExit(f"error: {str(e).strip().splitlines()[0]}") from None
    args = fv
    names = [n for n in common.str_tuple(args.only)] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"error: unknown experiment(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(EXPERIMENTS)}")
    root = args.out_root or common.RESULTS_ROOT
    os.makedirs(root, exist_ok=True)
    status = {}
    for name in names:
        start, cpu = time.time(), time.process_time()
        extra = [f"--out={os.path.join(root, name)}"] if args.out_root else []
        try:
            module = importlib.import_module(f"experiments.{name}")
            code = module.main([*rest, *extra])
            outcome = "ok" if code == 0 else f"exit code {code}"
        except Exception as e:  # keep going: one broken experiment must not hide the others
            traceback.print_exc()
            outcome = f"{type(e).__name__}: {e}"
        status[name] = {"status": outcome, "wall_seconds": round(time.time() - start, 1),
                        "cpu_seconds": round(time.process_time() - cpu, 1)}
        print(f"=== {name}: {outcome} ({status[name]['wall_seconds']:.0f} s wall, "
              f"{status[name]['cpu_seconds']:.0f} s CPU)", file=sys.stderr, flush=True)
        if args.out_root:
            with open(os.path.join(root, "status.json"), "w") as f:
                json.dump(status, f, indent=1)
    return 0 if all(s["status"] == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
