"""The benchmarks' timing loop: warm-up steps, then the mean wall time of the timed ones, the device's peak memory
counted from the first timed step."""
import time

import torch


def time_steps(step, warmup: int, steps: int, sync=None) -> tuple[list, float]:
    """`warmup` calls of `step` (their results), then the mean seconds of `steps` more. `sync` waits for the device
    (and, across processes, for the others); default: CUDA's synchronize where there is CUDA."""
    cuda = torch.cuda.is_available()
    sync = sync or (torch.cuda.synchronize if cuda else (lambda: None))
    results = [step() for _ in range(warmup)]
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return results, (time.perf_counter() - t) / steps

