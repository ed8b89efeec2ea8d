"""Readers shared by the infra tests: the cluster YAMLs, the KubeRay manifests, node groups.

Node groups are compared in Ray's own terms: the cluster-launcher YAML after Ray's
``prepare_config`` (defaults merged, as ``ray up`` does), and the KubeRay RayCluster spec
after Ray's ``_derive_autoscaling_config_from_ray_cr``, the function the in-tree autoscaler
runs on the head pod to read the custom resource.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CLUSTER_DIR = INFRA / "cluster"
KUBERAY_DIR = INFRA / "kuberay"
AWS_YAML = CLUSTER_DIR / "aws.yaml"

# Resources that describe a node type's size; "memory" is left out because the cluster
# launcher detects it from the instance type while KubeRay reads it from the pod limits.
COMPARED_RESOURCES = ("CPU", "GPU")


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    return yaml.safe_load(path.read_text())


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a (possibly multi-document) manifest file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def prepared_cluster_config(path: Path) -> dict[str, Any]:
    """The launcher YAML as ``ray up`` sees it before it contacts the cloud."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(load_yaml(path)))


def launcher_worker_groups(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{type: {"min": n, "max": n, "resources": {...}}}`` for every worker type of a launcher config."""
    head = config["head_node_type"]
    return {
        name: {
            "min": spec.get("min_workers", 0),
            "max": spec["max_workers"],
            "resources": {k: v for k, v in spec["resources"].items() if k in COMPARED_RESOURCES},
        }
        for name, spec in config["available_node_types"].items()
        if name != head
    }


def kuberay_autoscaling_config(cluster_cr: dict[str, Any]) -> dict[str, Any]:
    """What Ray's autoscaler derives from a RayCluster custom resource (validated by Ray)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(cluster_cr)
    cr.setdefault("metadata", {}).setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(cr)


def kuberay_worker_groups(cluster_cr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Same shape as :func:`launcher_worker_groups`, read the way the in-tree autoscaler reads it."""
    derived = kuberay_autoscaling_config(cluster_cr)
    return launcher_worker_groups(derived)


def as_cluster_cr(name: str, cluster_spec: dict[str, Any]) -> dict[str, Any]:
    """Wrap a RayJob's ``rayClusterSpec`` as the RayCluster KubeRay creates from it."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name}, "spec": cluster_spec}


def parse_entrypoint(entrypoint: str) -> tuple[str, str, list[str]]:
    """``python -m jobs.X --config FILE a.b=c ...`` -> (module, config path, overrides)."""
    argv = shlex.split(entrypoint)
    if argv[:2] != ["python", "-m"] or len(argv) < 3:
        raise ValueError(f"entrypoint: expected 'python -m jobs.<name> ...', got {entrypoint!r}")
    module = argv[2]
    rest = argv[3:]
    if "--config" not in rest:
        raise ValueError(f"entrypoint {entrypoint!r}: expected --config FILE")
    i = rest.index("--config")
    config = rest[i + 1]
    overrides = rest[:i] + rest[i + 2 :]
    return module, config, overrides


def module_file(module: str) -> Path:
    """``jobs.pretrain`` -> ``<repo>/jobs/pretrain.py``."""
    return ROOT / (module.replace(".", "/") + ".py")
