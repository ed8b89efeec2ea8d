"""The job that test_fake_autoscaling.py runs on a fake autoscaling cluster, as a Ray driver.

It runs in its own process (like a job submitted with ``ray job submit``) so that the
pytest process never connects to that cluster. It asks for what a wavray run asks for,
scaled down: CPU-only tasks like Ray Data's decoders, then a placement-group bundle with a
GPU like a Ray Train worker, and reports on stdout, as one JSON object, where each part ran
and how the cluster's nodes came and went. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def _where() -> dict[str, Any]:
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_type": os.environ.get("RAY_NODE_TYPE_NAME", ""),
    }


@ray.remote(num_cpus=1)
def decode_shard(index: int) -> dict[str, Any]:
    """Stands for a Ray Data decode task: CPU only."""
    return {"index": index, **_where()}


@ray.remote
def train_step() -> dict[str, Any]:
    """Stands for a Ray Train worker: runs inside the trainer bundle and sees its GPU."""
    return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], **_where()}


def _alive_nodes() -> list[dict[str, Any]]:
    return [
        {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
        for n in ray.nodes()
        if n["Alive"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True, help="GCS address, 127.0.0.1:PORT")
    parser.add_argument("--num-decode-tasks", type=int, default=2)
    parser.add_argument("--trainer-bundle", required=True, help='JSON, e.g. {"CPU": 1, "GPU": 1}')
    parser.add_argument("--step-timeout-s", type=float, default=60.0)
    parser.add_argument("--scale-down-timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    bundle = json.loads(args.trainer_bundle)

    ray.init(address=args.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    report: dict[str, Any] = {"driver_ip": ray.util.get_node_ip_address()}
    t0 = time.monotonic()
    report["nodes_at_start"] = _alive_nodes()

    # 1. CPU-only demand (decoding): the head has no CPU, so a worker node must be added.
    report["decode"] = ray.get(
        [decode_shard.remote(i) for i in range(args.num_decode_tasks)], timeout=args.step_timeout_s
    )
    report["decode_done_s"] = time.monotonic() - t0
    report["nodes_after_decode"] = _alive_nodes()

    # 2. Trainer demand: a GPU bundle, reserved the way Ray Train reserves its workers.
    pg = placement_group([bundle], strategy="PACK")
    ray.get(pg.ready(), timeout=args.step_timeout_s)
    report["train"] = ray.get(
        train_step.options(
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(),
        timeout=args.step_timeout_s,
    )
    report["train_done_s"] = time.monotonic() - t0
    report["nodes_at_peak"] = _alive_nodes()
    remove_placement_group(pg)

    # 3. Nothing left to run: the autoscaler should remove every idle worker node.
    deadline = time.monotonic() + args.scale_down_timeout_s
    nodes = _alive_nodes()
    while len(nodes) > 1 and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = _alive_nodes()
    report["nodes_at_end"] = nodes
    report["scale_down_done_s"] = time.monotonic() - t0
    ray.shutdown()
    print("FAKE_CLUSTER_REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
