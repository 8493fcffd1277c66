"""Running a test body in 2 gloo processes, shared by the DDP tests.

``spawn2(worker, *args)`` calls ``worker(rank, port, *args)`` in two processes on a free port.
A worker that *raises* (a failed assertion, a wrong result) fails the test at once. A worker
killed by a signal is retried once on a fresh port: gloo's threads sometimes abort at process
teardown ("terminate called without an active exception", SIGABRT; seen once here, in a
clean-clone run of the suite on 2 cores on 2026-11-30), which says nothing about routing.
"""
import socket

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn2(worker, *args, tries: int = 2) -> None:
    for attempt in range(tries):
        try:
            mp.spawn(worker, args=(free_port(), *args), nprocs=2, join=True)
            return
        except ProcessExitedException as e:
            if e.signal_name is None or attempt == tries - 1:
                raise
