"""Process-parallel map with a progress bar, shared by the corpus synthesiser, the scanner and featurisers."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

from fedhubert.runlog import progress

A = TypeVar("A")
R = TypeVar("R")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """0 means one worker per available CPU core."""
    return workers if workers > 0 else available_cpus()


THREAD_POOL_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")  # read when a library loads


def _one_thread_per_worker() -> None:
    """The workers are the parallelism: BLAS/OpenMP thread pools in each would fight over the same cores.
    Runs before the worker imports anything numerical, so the variables take effect when the libraries load."""
    for name in THREAD_POOL_VARIABLES:
        os.environ[name] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def parallel_map(
    fn: Callable[[A], R], items: Sequence[A], *, workers: int, desc: str, unit: str = "it"
) -> Iterator[tuple[int, R]]:
    """Yield (index, fn(item)) as results complete. One worker runs in-process (no pickling, easy to debug).

    Workers are spawned, not forked, so they never inherit locks held by threads of the parent (tqdm, logging),
    and each runs its numerical libraries single-threaded.
    An exception in a worker is re-raised here, and the pending work is cancelled.
    """
    if not items:
        return
    workers = min(resolve_workers(workers), len(items))
    if workers == 1:
        for index, item in enumerate(progress(items, total=len(items), desc=desc, unit=unit)):
            yield index, fn(item)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_one_thread_per_worker) as pool:
        futures = {pool.submit(fn, item): index for index, item in enumerate(items)}
        try:
            for future in progress(as_completed(futures), total=len(futures), desc=desc, unit=unit):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
