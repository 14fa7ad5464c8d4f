"""Run experiments: ``python -m experiments.run NAME [NAME ...] [flags] [--config.FIELD=VALUE]``.

``NAME`` is one of ``EXPERIMENTS`` or ``all``. Every (variant, seed) trains through
``cnn_jax.train_lib.train_and_evaluate`` in ``<workdir>/<name>/<variant>/seed<k>``; re-running the
same command resumes unfinished runs and reads finished ones, so a long set can be stopped and
restarted at any time. ``--config.FIELD=VALUE`` (and ``--config.model.FIELD=VALUE``) override
every variant's training config, in the language of ``python -m cnn_jax.train``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from cnn_jax import cli  # noqa: E402

cli.quiet_tensorflow_env("2")  # before anything imports TensorFlow

# The default set, cheapest first (with --jobs=0 a partial run has the cheap ones done; workers
# take the most expensive runs first, so that the last to finish are short).
EXPERIMENTS = ("activations", "shortcuts", "bn_placement", "degradation", "alexnet_ablation",
               "resnet_vs_densenet")


def _define(fv: flags.FlagValues, argv: List[str]) -> None:
    from ml_collections import config_flags

    from cnn_jax.configs.common import base_config

    flags.DEFINE_bool("smoke", False, "tiny data and networks, 2 epochs: checks every code path "
                      "in seconds", flag_values=fv)
    flags.DEFINE_list("seeds", None, "seeds to run (default: the experiment's, 0,1,2)",
                      flag_values=fv)
    flags.DEFINE_list("variants", None, "variant labels to run (default: the experiment's set)",
                      flag_values=fv)
    flags.DEFINE_string("out", None, "results folder (default experiments/results; one "
                        "subfolder per experiment)", flag_values=fv)
    flags.DEFINE_string("workdir", None, "training workdirs (default workdir/experiments; one "
                        "subfolder per experiment); keep it to resume", flag_values=fv)
    flags.DEFINE_bool("compilation_cache", True, "keep compiled programs on disk (as every "
                      "cnn_jax command)", flag_values=fv)
    flags.DEFINE_integer("jobs", None, "train this many runs at a time, each in its own process "
                         "on one CPU core (default: one per core; a run's numbers do not depend "
                         "on it); 0: one run at a time in this process, on all its cores (the "
                         "default on a GPU/TPU)", lower_bound=0, flag_values=fv)
    config_flags.DEFINE_config_dict("config", base_config(), "overrides of every variant's "
                                    "training config", flag_values=fv, lock_config=False,
                                    accept_new_attributes=True, sys_argv=argv)


def names_from(args: Sequence[str]) -> List[str]:
    if not args:
        raise ValueError(f"name an experiment: {', '.join(EXPERIMENTS)} or all")
    names = list(EXPERIMENTS) if list(args) == ["all"] else list(args)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(EXPERIMENTS)} or all")
    return names


def recorded_args(argv: Sequence[str]) -> List[str]:
    """The arguments each README's command records: all but the experiment names (a flag's value
    may be the next argument, ``--workdir DIR``)."""
    return [a for a in argv if a not in (*EXPERIMENTS, "all")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    cli.import_tensorflow_quietly()
    argv = list(sys.argv[1:] if argv is None else argv)
    given = recorded_args(argv)
    return cli.run_command("experiments.run", _define, lambda fv, args: _run(fv, args, given),
                           argv, positional="NAME|all [NAME ...]",
                           description=f"{__doc__}\nexperiments: {', '.join(EXPERIMENTS)}")


def _run(fv: flags.FlagValues, args: Sequence[str], given: Sequence[str]) -> int:
    from absl import logging
    from ml_collections import config_flags

    names = names_from(args)
    overrides = config_flags.get_override_values(fv["config"])
    if fv.seeds and not all(s.strip().lstrip("-").isdigit() for s in fv.seeds):
        raise ValueError(f"--seeds takes integers, e.g. --seeds=0,1,2 (got {','.join(fv.seeds)})")
    seeds = [int(s) for s in fv.seeds] if fv.seeds else None
    logging.set_verbosity(logging.ERROR)  # TFDS's notices about generated `shapes` configs
    cache_dir = ""
    if fv.compilation_cache:
        cache_dir = (os.environ.get("JAX_COMPILATION_CACHE_DIR") or
                     cli.DEFAULT_COMPILATION_CACHE_DIR)
        cli.enable_compilation_cache(cache_dir)
    from experiments import common, parallel

    def workdir_of(name):
        return os.path.join(fv.workdir, name) if fv.workdir else None

    jobs = fv.jobs
    if jobs is None:
        import jax

        jobs = len(parallel.cores()) if jax.default_backend() == "cpu" else 0
    status, code, failed, begin = {}, 0, {}, time.time()
    if jobs:
        exps = [importlib.import_module(f"experiments.{n}").get_experiment(fv.smoke)
                for n in names]
        tasks = parallel.plan(exps, seeds, fv.variants, overrides,
                              lambda n: workdir_of(n) or os.path.join(common.WORKDIR_ROOT, n))
        try:
            failed = parallel.run(tasks, jobs, fv.smoke, overrides, cache_dir,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
        except common.Interrupted as e:  # SIGTERM: every run in progress saved a checkpoint
            print(f"=== {e}", file=sys.stderr, flush=True)
            status = {n: {"status": "interrupted"} for n in names}
            names, code = [], 1
    for name in names:
        start = time.time()
        try:
            if name in failed:
                raise RuntimeError(failed[name])
            exp = importlib.import_module(f"experiments.{name}").get_experiment(fv.smoke)
            command = common.command_line([name, *given])
            common.run(exp, seeds=seeds, variants=fv.variants, overrides=overrides,
                       workdir=workdir_of(name),
                       out=os.path.join(fv.out, name) if fv.out else None, command=command,
                       jobs=jobs, start=begin if jobs else None)
            outcome = "ok"
        except common.Interrupted as e:  # SIGTERM: stop the set, resumable
            print(f"=== {name}: {e}", file=sys.stderr, flush=True)
            status[name] = {"status": "interrupted", "wall_seconds": round(time.time() - start, 1)}
            code = 1
            break
        except ValueError as e:  # bad input: one line, and the other experiments still run
            outcome = f"error: {str(e).strip().splitlines()[0]}"
            print(outcome, file=sys.stderr, flush=True)
            code = 1
        except Exception as e:  # noqa: BLE001 -- one broken experiment must not hide the others
            if name not in failed:  # a worker's error was printed with its traceback
                traceback.print_exc()
            outcome = f"{type(e).__name__}: {e}"
            code = 1
        status[name] = {"status": outcome, "wall_seconds": round(time.time() - start, 1)}
        print(f"=== {name}: {outcome} ({status[name]['wall_seconds']:.0f} s)", file=sys.stderr,
              flush=True)
    if jobs and names:
        print(f"=== all: {(time.time() - begin) / 60:.1f} min with {jobs} single-core "
              "workers", file=sys.stderr, flush=True)
    if fv.out:
        os.makedirs(fv.out, exist_ok=True)
        with open(os.path.join(fv.out, "status.json"), "w") as f:
            json.dump(status, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
