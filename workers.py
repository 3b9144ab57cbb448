"""The --workers pool: processes that take the next job from a shared counter, die with their
parent, and send each result back on one queue."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1  # Linux prctl option (sys/prctl.h)


def run(task: Callable[[Any], Any], jobs: Sequence, count: int,
        setup: Callable[[], None] | None = None) -> Iterator:
    """task(job) of each job, in the order they finish, in `count` processes that each call
    setup() first. A task's exception is raised here, as multiprocessing.Pool does."""
    context = worker_context()
    next_job = context.Value("i", 0)
    results = context.Queue()
    processes = [context.Process(target=_worker,
                                 args=(task, setup, jobs, next_job, results, os.getpid()),
                                 daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    finished = False
    try:
        for _ in jobs:
            result = _next_result(results, processes)
            if isinstance(result, BaseException):
                raise result
            yield result
        finished = True
    finally:
        for process in processes:
            if not finished:  # an error, or the caller stopped early: its files stay atomic
                process.terminate()
            process.join()


def _worker(task: Callable[[Any], Any], setup: Callable[[], None] | None, jobs: Sequence,
            next_job, results, parent: int) -> None:
    """One --workers process: takes the next job from the shared counter until none is left,
    or the parent is gone (killed). No task queue: the parent only collects results, so it
    takes no CPU from the workers."""
    die_with_parent()
    if setup is not None:
        setup()
    while os.getppid() == parent:
        with next_job.get_lock():
            index = next_job.value
            next_job.value += 1
        if index >= len(jobs):
            return
        try:
            results.put(task(jobs[index]))
        except Exception as error:  # re-raised by the parent, as multiprocessing.Pool does
            results.put(error)
            return


def die_with_parent() -> None:
    """On Linux, be killed with the parent: a re-run started right after `kill -9` must not
    race a worker of the killed run that is still writing (elsewhere the worker stops after its
    job, when it sees the parent gone)."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _next_result(results, processes: list) -> Any:
    """The next result from the workers; an error if one of them died without giving one."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead or not any(p.is_alive() for p in processes):
                raise RuntimeError(f"a --workers process exited with code {dead[0] if dead else 0}"
                                   " before its speaker was written; re-run to resume (finished "
                                   "speakers are kept)") from None


def worker_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe: forked workers start with every module imported (spawned ones
    import them again, ~0.6 s each). TensorFlow's threads in this process make fork unsafe."""
    if sys.platform == "linux" and "tensorflow" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")
