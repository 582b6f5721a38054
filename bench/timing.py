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


def graphed(step, warmup: int, generators=()):
    """`step` (a whole training step: forward, backward, optimizer) captured as one CUDA graph after `warmup` calls
    on a side stream (compiling, autotuning, the optimizer's state): each call of the returned function replays it,
    so no kernel waits on the host that launches it. The step must hold no host sync and no host-to-device copy,
    its inputs must stay where they are, and `generators` (the step's own random generators) advance per replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the warm-up's cached blocks back, for the graph's own pool
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out
    return replay


def graph_the_step(step, stepper, batch, opt, warmup):
    """The Stepper's step made capturable, then captured (timing.graphed): the optimizer's step counts on the device
    (capturable), autocast's cast cache off (its cached casts would be freed inside the graph), the batch's loss
    weights already on the device."""
    for group in opt.param_groups:
        group["capturable"] = True
    stepper.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    batch.loss_weights = batch.loss_weights.to(stepper.generator.device)
    return graphed(step, warmup, [stepper.generator])
