"""Run ``python -m cnn_jax.<command> ...`` as forks of one process that imported the libraries once.

Each ``python -m`` subprocess of the CLI tests spends 5-8 s importing JAX, Flax, TensorFlow, TFDS and
Orbax before the command does anything. :class:`Zygote` starts one Python process that imports them
(without starting a JAX backend or running a TensorFlow op) and then forks a child per command: the
child is a real process (its own exit code, stdout, stderr, JAX backend, ``XLA_FLAGS`` and device
count) that runs the command's module as ``__main__``, exactly as ``python -m`` does, minus the
imports. :meth:`Zygote.start` returns while the command runs (its pid, to signal it: the SIGTERM
test). Tests that are about a single process start (the first screen of a run) still start one
with :func:`_train_helpers.run_python`.

Run as a script, this file is the zygote: one JSON request per line on stdin
(``{"module", "args", "env", "stdout", "stderr"}``), one JSON reply per line on stdout
(``{"pid"}`` when the child starts, ``{"returncode"}`` when it ends).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence

import _train_helpers as h

# Imported once by the zygote: what `python -m cnn_jax.train/evaluate/benchmark` import first.
PRELOAD = ("absl.app", "ml_collections.config_flags", "jax", "flax.linen", "optax",
           "tensorflow", "tensorflow_datasets", "orbax.checkpoint", "cnn_jax.cli", "cnn_jax.configs",
           "cnn_jax.models", "cnn_jax.train_lib", "cnn_jax.input_pipeline", "cnn_jax.checkpoint",
           "cnn_jax.loading", "cnn_jax.protocols")


class Zygote:
    """One zygote process; :meth:`run` is :func:`_train_helpers.run_python` for ``-m`` commands."""

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="cli_zygote_")
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=h.REPO,
                                      env=h.python_env(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self._count, self._buffer = 0, b""

    def run(self, args: Sequence[str], timeout: float = 300,
            **env_kwargs) -> subprocess.CompletedProcess:
        """``args`` as for ``python``: ``["-m", "cnn_jax.train", "--arch=..."]``."""
        return self.start(args, max(timeout, 300), **env_kwargs).wait(timeout)

    def start(self, args: Sequence[str], timeout: float = 300, **env_kwargs) -> "Child":
        """Start the command and return at once (once it is forked): :class:`Child` has its
        ``pid`` (to signal it), ``poll()`` and ``wait()``. One command at a time."""
        assert args[0] == "-m", args
        self._count += 1
        out = os.path.join(self._dir, f"{self._count}.out")
        err = os.path.join(self._dir, f"{self._count}.err")
        request = {"module": args[1], "args": list(args[2:]), "env": h.python_env(**env_kwargs),
                   "stdout": out, "stderr": err}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        pid = json.loads(self._reply(timeout))["pid"]  # the first waits for the imports
        return Child(self, [sys.executable, *args], pid, out, err)

    def _reply(self, timeout: float) -> str:
        """The next line from the zygote (read from the raw pipe: no buffer that select misses)."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise subprocess.TimeoutExpired("cli zygote", timeout)
            chunk = os.read(fd, 65536)
            assert chunk, f"the CLI zygote died (exit code {self._proc.poll()})"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class Child:
    """A command forked by :meth:`Zygote.start`; like a :class:`subprocess.Popen` of it."""

    def __init__(self, zygote: Zygote, args, pid: int, out: str, err: str):
        self._zygote, self.args, self.pid, self._out, self._err = zygote, args, pid, out, err
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        """The exit code once the command has ended, else None (does not wait)."""
        if self.returncode is None:
            try:
                self.returncode = json.loads(self._zygote._reply(0))["returncode"]
            except subprocess.TimeoutExpired:
                pass
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """Wait for the end (SIGKILL after ``timeout`` s, as subprocess.run does): its exit code,
        stdout and stderr."""
        if self.returncode is None:
            try:
                self.returncode = json.loads(self._zygote._reply(timeout))["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)  # the zygote then replies
                self.returncode = json.loads(self._zygote._reply(60))["returncode"]
                raise subprocess.TimeoutExpired(self.args, timeout)
        with open(self._out) as f_out, open(self._err) as f_err:
            return subprocess.CompletedProcess(self.args, self.returncode, f_out.read(),
                                               f_err.read())


def _child(request: Dict) -> int:
    """In the fork: become ``python -m <module> <args>`` and return its exit code."""
    import runpy
    import traceback

    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(os.devnull)
    sys.argv = [request["module"], *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:  # what the interpreter does with it
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: B036 -- an uncaught exception: traceback, exit code 1
        traceback.print_exc()
        code = 1
    return code


def _serve(stdin, stdout) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for line in stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code: Optional[int] = 1
            try:
                code = _child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if code is not None else 1)
        stdout.write(json.dumps({"pid": pid}) + "\n")
        stdout.flush()
        _, status = os.waitpid(pid, 0)
        stdout.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        stdout.flush()


if __name__ == "__main__":
    # Replies go on a duplicate of stdout: the children's fd 1 is their own file.
    replies = os.fdopen(os.dup(1), "w")
    _serve(sys.stdin, replies)
