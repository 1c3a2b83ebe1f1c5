"""Many processes, one run: everything about torchrun's process group lives here.

`torchrun` starts one process per device and tells each who it is through the environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `process_group`
reads that, joins the group (NCCL on CUDA, gloo on CPU), gives each local rank its own device,
and leaves the group at the end. Without torchrun's environment it is one process on the device
asked for, and every function below is the identity or a no-op, so a single-process run takes
exactly the code path it always took.

What the training and the scoring use:
- `step_rows`: each epoch's seeded permutation, the same on every rank, cut into global batches
  of `batch_size x world_size`; each rank takes its slice of each, so the shards are disjoint and
  cover the split, and every rank takes the same number of steps (a rank that ran out of steps
  early would leave the others waiting in a collective for ever);
- `gather_rows`: every rank's predictions, put back in row order on every rank, so each rank
  computes the same metrics, best epoch and threshold that one process would compute on them;
- `local_main_first`: local rank 0 of each node does a thing (downloading and decoding every
  image into the node's cache) while the others wait, then they do it, reading its cache: each
  node fetches every image once, and no two processes write one cache entry;
- `StopSignal` and `agree`: SIGTERM (what a spot interruption sends) noted by a handler, and
  the ranks agreeing at a step boundary that one of them was told to stop.

A rank that dies ends the job: torchrun's agent stops the other ranks and exits non-zero; a rank
alive but stuck leaves the others waiting in a collective at most `config.DISTRIBUTED_TIMEOUT_S`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xraylib import config
from xraylib.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    """Who this process is among the run's processes; `Topology()` is a run of one."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The one process that writes files and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Topology()


def topology_from_environment(env: Mapping[str, str] | None = None) -> Topology:
    """The topology torchrun's environment variables describe; `SINGLE` without them."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return SINGLE
    try:
        world_size = int(env["WORLD_SIZE"])
        return Topology(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", "0")), world_size=world_size,
                        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))))
    except ValueError:
        raise ConfigError(f"cannot read torchrun's environment (RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                          f"LOCAL_RANK={env.get('LOCAL_RANK')!r}): start the run with torchrun, or unset them") from None


def _device_for(topology: Topology, device: str) -> Any:
    import torch

    from xraylib.model import resolve_device

    chosen = resolve_device(device)
    if chosen.type != "cuda" or not topology.is_distributed:
        return chosen
    if topology.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {topology.local_rank} has no GPU of its own ({torch.cuda.device_count()} on this "
                          "machine): start at most one process per GPU (torchrun --nproc_per_node)")
    torch.cuda.set_device(topology.local_rank)
    return torch.device("cuda", topology.local_rank)


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[tuple[Topology, Any]]:
    """(topology, torch device) of this process for the duration of the block: joined to torchrun's
    process group when started by torchrun (NCCL on CUDA, gloo on CPU), on its own device; left at
    the end. Without torchrun, (`SINGLE`, the device `device` resolves to) and nothing else."""
    topology = topology_from_environment()
    torch_device = _device_for(topology, device)
    if not topology.is_distributed:
        yield topology, torch_device
        return
    import datetime

    import torch.distributed as dist

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=config.DISTRIBUTED_TIMEOUT_S),
                                **({"device_id": torch_device} if torch_device.type == "cuda" else {}))
    try:
        yield topology, torch_device
        if started_here:
            # Every rank leaves together: destroying a gloo group while a peer is still in its last
            # collective can hang (seen with torch 2.4: both ranks waited in destroy_process_group).
            dist.barrier()
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()


def barrier(topology: Topology) -> None:
    if topology.is_distributed:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def local_main_first(topology: Topology) -> Iterator[None]:
    """Local rank 0 of every node runs the block first; the other ranks run it once it has finished
    (reading what it left in the node's caches)."""
    if topology.local_rank != 0:
        barrier(topology)
    yield
    if topology.local_rank == 0:
        barrier(topology)


def wrap(network: Any, topology: Topology, device: Any) -> Any:
    """`network` in DistributedDataParallel, which averages the gradients of every rank at each
    step; `network` itself when the run is one process."""
    if not topology.is_distributed:
        return network
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)


def step_rows(order: Any, batch_size: int, topology: Topology = SINGLE) -> list[Any]:
    """This rank's rows of each training step, from the epoch's permutation `order` (the same on
    every rank). Step k's global batch is `order[k*B*W:(k+1)*B*W]` (B the batch size per process,
    W the world size), split into W consecutive parts, part r to rank r; the last, shorter global
    batch is split as evenly as it goes. A run of one gets `order` cut into batches, as always."""
    import torch

    if not topology.is_distributed:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    step = batch_size * topology.world_size
    return [torch.tensor_split(order[start:start + step], topology.world_size)[topology.rank]
            for start in range(0, len(order), step)]


def smallest_part(n_rows: int, batch_size: int, topology: Topology, step: int) -> int:
    """The fewest rows any rank has at `step` (as `step_rows` splits `n_rows`): a step is taken
    by every rank or by none, so BatchNorm's refusal of a batch of one is decided the same on all."""
    global_batch = min(batch_size * topology.world_size, n_rows - step * batch_size * topology.world_size)
    return global_batch // topology.world_size


def rows_of_rank(n_rows: int, topology: Topology = SINGLE) -> Any:
    """This rank's share of `n_rows` rows for scoring: every W-th row from its rank on."""
    import torch

    return torch.arange(topology.rank, n_rows, topology.world_size)


def gather_rows(values: np.ndarray, rows: Any, n_rows: int, topology: Topology, device: Any) -> np.ndarray:
    """Every rank's `values` (one per row of `rows`, this rank's share) as one array in row order,
    the same on every rank. A run of one returns `values`."""
    if not topology.is_distributed:
        return values
    import torch
    import torch.distributed as dist

    longest = -(-n_rows // topology.world_size)
    # NCCL moves tensors that live on the GPU; gloo those on the CPU.
    padded_values = torch.zeros(longest, dtype=torch.float64, device=device)
    padded_rows = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded_values[:len(values)] = torch.as_tensor(values, dtype=torch.float64, device=device)
    padded_rows[:len(values)] = torch.as_tensor(rows, dtype=torch.int64, device=device)
    all_values = [torch.empty_like(padded_values) for _ in range(topology.world_size)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(topology.world_size)]
    dist.all_gather(all_values, padded_values)
    dist.all_gather(all_rows, padded_rows)
    flat_rows = torch.cat(all_rows).cpu().numpy()
    flat_values = torch.cat(all_values).cpu().numpy()
    kept = flat_rows >= 0
    out = np.full(n_rows, np.nan)
    out[flat_rows[kept]] = flat_values[kept]
    if np.count_nonzero(kept) != n_rows or np.isnan(out).any():
        raise RuntimeError(f"gathered {np.count_nonzero(kept)} predictions for {n_rows} rows: the ranks' shards disagree")
    return out


def sum_over_ranks(values: list[float], topology: Topology, device: Any) -> list[float]:
    """`values` summed over every rank (each rank gets the sums)."""
    if not topology.is_distributed:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def agree(flag: bool, topology: Topology, device: Any) -> bool:
    """True on every rank when `flag` is true on any."""
    if not topology.is_distributed:
        return flag
    return sum_over_ranks([float(flag)], topology, device)[0] > 0


def broadcast_object(value: Any, topology: Topology) -> Any:
    """Rank 0's `value` on every rank (pickled)."""
    if not topology.is_distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, topology: Topology) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None on the others); `[value]` in a run of one."""
    if not topology.is_distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * topology.world_size
    dist.all_gather_object(out, value)
    return out if topology.is_main else None


class StopSignal:
    """Notes SIGTERM while the block runs instead of dying of it: SageMaker sends it before a spot
    instance is taken back, torchrun's agent when it stops the job. The run checks `requested`
    at each step boundary, saves and exits. The earlier handler is put back at the end. Installed
    only from the main thread (the only one Python lets install handlers)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _note(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def rank_generator(generator: Any, topology: Topology) -> Any:
    """A generator of this rank's own random draws (augmentations), seeded from one draw of
    `generator`, which every rank shares and so keeps drawing the same permutations."""
    import torch

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed + topology.rank)


def share_buffers(module: Any, topology: Topology) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) into `module` on every rank. Each rank's
    last training forward pass updated its own from its own batch; DistributedDataParallel would
    send rank 0's only at the next one, so without this the ranks would validate different models."""
    if not topology.is_distributed:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
