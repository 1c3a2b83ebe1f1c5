"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: each rank takes its shard of
a seeded permutation (`distributed.step_rows`) and scores its share of rows (`rows_of_rank`), and
rank 0 prints, as JSON, every rank's shard and whether `gather_rows` put the scores back in row
order on every rank."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from xraylib import distributed


def main(n_rows: int, batch_size: int) -> None:
    with distributed.process_group("cpu") as (topology, device):
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(7))
        steps = distributed.step_rows(order, batch_size, topology)
        shard = [row for step in steps for row in step.tolist()]
        rows = distributed.rows_of_rank(n_rows, topology)
        gathered = distributed.gather_rows(rows.numpy() * 10.0 + 0.5, rows.numpy(), n_rows, topology, device)
        in_order = bool(np.array_equal(gathered, np.arange(n_rows) * 10.0 + 0.5))
        everyone = distributed.gather_objects({"rank": topology.rank, "shard": shard, "steps": len(steps),
                                               "in_order": in_order, "order": order.tolist()}, topology)
        if topology.is_main:
            print(json.dumps(everyone))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
