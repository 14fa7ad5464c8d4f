"""Test-session set-up: one persistent XLA compilation cache for every test process.

pytest-xdist's workers and the command-line tools the tests start in subprocesses compile many
of the same programs (the same small models' init, train and eval steps); with the cache each is
compiled once per checkout. It lives in .pytest_cache/ (git-ignored), so a fresh clone starts
cold; set JAX_COMPILATION_CACHE_DIR to put it elsewhere, or CNN_JAX_TEST_COMPILATION_CACHE=0 to
compile everything anew.

XLA's CPU backend runs at optimization level 0 with its older elemental IR emitters instead of the
fusion emitters, for the whole session (and for the subprocesses, which inherit XLA_FLAGS): the
tests' programs are small and run a few steps, so compiling is most of their cost. Measured here
(cold compiles): an un-jitted densenet121 forward (968 per-op compiles) 50 s -> 33 s (-O0) -> 24 s
(both), its jitted forward 9.1 s -> 5.6 s -> ~4.5 s. Results differ by float rounding at most.
YNNPACK runs single dots and convolutions only, not XLA's multi-op library fusions: at the tests'
small inputs VGG's head upsamples a 1x1 map to 7x7 before fc6, and XLA fuses that broadcast and
the three classifier matmuls into one YNNPACK call that costs 2.3 s of CPU per 2-image eval
forward of vgg11 at 32x32 (0.24 s with single ops). The commands keep XLA's default: its
library fusions of reductions make the batch-norm statistics of a train step fast at 224 px
(README, Fast layers: the max pool).
LLVM compiles each program as one module (``--xla_cpu_parallel_codegen_split_count=1``) rather
than splitting it to compile the parts on several threads: the two test workers keep both cores
busy already, and the split and the module's copies cost CPU (``llvm::SplitModule`` and
``CloneModule``: 11% of a densenet121 compile in ``perf``). Eight programs (densenet121,
googlenet, resnet50 and vgg16, eval and train mode) on one core: 11.0-11.4 s -> 8.2-8.5 s of CPU.
CNN_JAX_TEST_XLA_OPT=1 keeps XLA's defaults.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEST_XLA_FLAGS = ("" if os.environ.get("CNN_JAX_TEST_XLA_OPT", "0") == "1"
                  else "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                  "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution "
                  "--xla_cpu_parallel_codegen_split_count=1")
if TEST_XLA_FLAGS and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

if os.environ.get("CNN_JAX_TEST_COMPILATION_CACHE", "1") != "0":
    # Set before JAX is imported: JAX reads its config from the environment, and subprocesses
    # (python -m cnn_jax.train ...) inherit it through cnn_jax.cli's --compilation_cache_dir.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(_ROOT, ".pytest_cache", "jax_compilation_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
else:
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"


from cnn_jax import cli  # noqa: E402 (after XLA_FLAGS: it imports absl only, not JAX)

# The test processes trace hundreds of models: the commands' garbage-collector thresholds
# (cnn_jax/cli.py, GC_THRESHOLDS) spare them most of the collector's rescans of a growing heap.
cli.tune_gc()


# The slowest files first, those with one long indivisible item (a module fixture, one test)
# before those made of many short tests: pytest-xdist's --dist loadfile hands each worker one file
# at a time, so a slow file picked up last would leave the other worker idle at the end. Seconds
# of CPU of each file alone, cold: experiments ~125 (smoke fixture ~90), notebooks ~95 (one
# kernel), forward_jit ~110, convert ~110, shapes_dataset ~90 (tiny-CNN training ~50), eager ~75.
# Files not listed keep their collection order after these.
SLOW_FILES_FIRST = (
    "test_experiments.py", "test_notebooks.py", "test_forward_jit.py", "test_convert.py",
    "test_shapes_dataset.py", "test_forward_eager.py", "test_train_cli.py", "test_train_step.py",
    "test_multihost.py", "test_parallel.py", "test_checkpoint.py",
    "test_models.py", "test_predict_export.py", "test_benchmark.py", "test_resnet.py",
    "test_densenet.py", "test_vgg.py", "test_fast_layers.py",
    "test_googlenet.py", "test_input_pipeline.py", "test_alexnet.py", "test_augment.py",
)


def pytest_configure(config):
    # xdist would otherwise order files by their number of tests (its --loadscope-reorder).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
