"""infra/kuberay/*.yaml: well-formed, runnable entry points, and the node groups of aws.yaml.

No KubeRay CRD schema ships in a Python package, so the fields that matter are checked by
hand, and the cluster specs go through Ray's own reader of a RayCluster
(``_derive_autoscaling_config_from_ray_cr``, what the in-tree autoscaler runs on the head
pod), which also validates the result against Ray's cluster-config schema. Its node
groups must equal aws.yaml's: same worker types, CPUs, GPUs, min and max, idle timeout.
"""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
import yaml
from infra_specs import (
    AWS_YAML,
    KUBERAY_DIR,
    ROOT,
    as_cluster_cr,
    kuberay_autoscaling_config,
    kuberay_worker_groups,
    launcher_worker_groups,
    load_documents,
    module_file,
    parse_entrypoint,
    prepared_cluster_config,
)
from ray.runtime_env import RuntimeEnv

from pipeline.config import load_config

MANIFESTS = sorted(KUBERAY_DIR.glob("*.yaml"))
RAYJOBS = {"pretrain": KUBERAY_DIR / "rayjob-pretrain.yaml", "sweep": KUBERAY_DIR / "rayjob-sweep.yaml"}
SAMPLE_RATE = 16_000


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in MANIFESTS for d in load_documents(p)]


def _params(pairs: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    return [pytest.param(name, doc, id=f"{name}:{doc.get('kind')}") for name, doc in pairs]


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(label, RayCluster CR) for the RayCluster and for the cluster of every RayJob."""
    out = []
    for name, doc in _documents():
        if doc["kind"] == "RayCluster":
            out.append((name, doc))
        elif doc["kind"] == "RayJob":
            out.append((name, as_cluster_cr(doc["metadata"]["name"], doc["spec"]["rayClusterSpec"])))
    return out


def _rayjob(which: str) -> dict[str, Any]:
    docs = load_documents(RAYJOBS[which])
    assert len(docs) == 1 and docs[0]["kind"] == "RayJob", f"{RAYJOBS[which].name}: expected one RayJob"
    return docs[0]


def _pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, rayStartParams, pod spec) of the head and every worker group."""
    spec = cluster["spec"]
    pods = [("head", spec["headGroupSpec"].get("rayStartParams", {}), spec["headGroupSpec"]["template"]["spec"])]
    for group in spec.get("workerGroupSpecs", []):
        pods.append((group["groupName"], group.get("rayStartParams", {}), group["template"]["spec"]))
    return pods


def test_the_expected_manifests_exist() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-pretrain.yaml", "rayjob-sweep.yaml"} <= names, names


@pytest.mark.parametrize("name,doc", _params(_documents()))
def test_every_document_is_a_well_formed_resource(name: str, doc: dict[str, Any]) -> None:
    assert isinstance(doc.get("metadata", {}).get("name"), str) and doc["metadata"]["name"], f"{name}: metadata.name"
    kind = doc.get("kind")
    if kind in ("RayCluster", "RayJob"):
        assert doc.get("apiVersion") == "ray.io/v1", f"{name}: apiVersion {doc.get('apiVersion')}"
    else:
        assert (kind, doc.get("apiVersion")) == ("ServiceAccount", "v1"), f"{name}: unexpected {kind}"


@pytest.mark.parametrize("label,cluster", _params(_cluster_specs()))
def test_cluster_spec_fields_that_matter(label: str, cluster: dict[str, Any]) -> None:
    spec = cluster["spec"]
    assert spec.get("enableInTreeAutoscaling") is True, f"{label}: in-tree autoscaling off"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{label}: token auth off"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{label}: tasks could land on the head"
    for group in spec["workerGroupSpecs"]:
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            assert key in group, f"{label}: worker group without {key}"
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
    for group, params, pod in _pods(cluster):
        container = pod["containers"][0]
        assert container.get("image"), f"{label}/{group}: no image"
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, f"{label}/{group}: requests != limits (the pod could be squeezed)"
        assert "cpu" in limits and "memory" in limits, f"{label}/{group}: CPU and memory limits"
        # The spill directory Ray is told about must be a mounted volume, not the image's layer.
        spill = params.get("object-spilling-directory")
        assert spill, f"{label}/{group}: no object-spilling-directory"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert spill in mounts, f"{label}/{group}: {spill} is not mounted"
        assert mounts[spill] in {v["name"] for v in pod.get("volumes", [])}, f"{label}/{group}: no volume"


@pytest.mark.parametrize("label,cluster", _params(_cluster_specs()))
def test_node_groups_agree_with_the_cluster_launcher(label: str, cluster: dict[str, Any]) -> None:
    launcher = prepared_cluster_config(AWS_YAML)
    derived = kuberay_autoscaling_config(cluster)  # Ray validates it against its schema here
    assert kuberay_worker_groups(cluster) == launcher_worker_groups(launcher), label
    assert derived["idle_timeout_minutes"] == launcher["idle_timeout_minutes"], label
    head = derived["available_node_types"][derived["head_node_type"]]["resources"]
    assert head["CPU"] == launcher["available_node_types"][launcher["head_node_type"]]["resources"]["CPU"]


def test_the_rayjobs_bring_the_raycluster_spec() -> None:
    """Same cluster whether it is long-lived or made for one job (images, groups, pods)."""
    (cluster,) = [d for n, d in _documents() if d["kind"] == "RayCluster"]
    for which in RAYJOBS:
        assert _rayjob(which)["spec"]["rayClusterSpec"] == cluster["spec"], f"rayjob-{which}.yaml drifted"


def test_one_image_tagged_with_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for _, cl in _cluster_specs() for _, _, pod in _pods(cl) for c in pod["containers"]}
    assert len(images) == 1, f"several images: {images}"
    assert next(iter(images)).endswith(f"/wavray:{version}"), f"{images} is not wavray {version}"


def test_pods_run_as_the_shipped_service_account() -> None:
    accounts = {d["metadata"]["name"] for _, d in _documents() if d["kind"] == "ServiceAccount"}
    used = {pod.get("serviceAccountName") for _, cl in _cluster_specs() for _, _, pod in _pods(cl)}
    assert used <= accounts, f"pods use {used}, manifests define {accounts}"


@pytest.mark.parametrize("which", sorted(RAYJOBS))
def test_rayjob_lifecycle_and_runtime_env(which: str) -> None:
    spec = _rayjob(which)["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    # A local working_dir is uploaded by the submitter pod, which only K8sJobMode has.
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    unknown = set(env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"runtimeEnvYAML: keys Ray does not know: {sorted(unknown)}"
    # working_dir is the checkout inside the image (the Dockerfile copies this repository
    # there; test_cluster_launcher checks the path): Ray checks the rest against this one.
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})


@pytest.mark.parametrize("which", sorted(RAYJOBS))
def test_rayjob_entrypoint_names_an_existing_job_and_config(which: str) -> None:
    module, config, _ = parse_entrypoint(_rayjob(which)["spec"]["entrypoint"])
    assert module == f"jobs.{which}", module
    assert module_file(module).is_file(), f"entry point {module_file(module).relative_to(ROOT)} does not exist"
    assert (ROOT / config).is_file(), f"config {config} does not exist"


def _trainer_group(cluster_spec: dict[str, Any]) -> dict[str, Any]:
    groups = kuberay_worker_groups(as_cluster_cr("x", cluster_spec))
    return groups["trainer"]


def test_pretrain_rayjob_config_resolves_and_fits_the_trainers() -> None:
    spec = _rayjob("pretrain")["spec"]
    _, config_path, overrides = parse_entrypoint(spec["entrypoint"])
    cfg = load_config(ROOT / config_path, overrides)  # unknown keys or bad values raise here
    for key in ("data.train_uri", "checkpoint.storage_path"):
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field).startswith("s3://"), f"{key}: a multi-node run needs s3://"
    assert cfg.tracking.uri.startswith("http"), "tracking.uri: a shared MLflow server"
    assert cfg.scaling.use_gpu
    trainer = _trainer_group(spec["rayClusterSpec"])
    gpus_per_pod, cpus_per_pod = trainer["resources"]["GPU"], trainer["resources"]["CPU"]
    assert cfg.scaling.num_workers <= trainer["max"] * gpus_per_pod, "more GPU workers than trainer pods hold"
    assert cfg.scaling.cpus_per_worker * gpus_per_pod <= cpus_per_pod / 2, "leave half the CPUs for decoding"
    # SPEC.md: BASE is ~1.4M samples per GPU x 64 GPUs = ~1.6 h of audio per update.
    hours = cfg.data.max_samples_per_batch * cfg.scaling.num_workers * cfg.train.grad_accum / SAMPLE_RATE / 3600
    assert hours == pytest.approx(1.6, rel=0.05), f"{hours:.2f} h of audio per update"


def test_every_gpu_pretrain_config_fits_the_trainer_group() -> None:
    """A config asking for more GPUs than the trainer group can grow to would wait forever."""
    (cluster,) = [d for _, d in _documents() if d["kind"] == "RayCluster"]
    trainer = _trainer_group(cluster["spec"])
    ceiling = trainer["max"] * trainer["resources"]["GPU"]
    gpu_configs = {}
    for path in sorted((ROOT / "jobs" / "configs" / "pretrain").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.scaling.use_gpu:
            gpu_configs[path.name] = cfg.scaling.num_workers
    assert gpu_configs, "no GPU pretraining config found in jobs/configs/pretrain"
    too_big = {name: n for name, n in gpu_configs.items() if n > ceiling}
    assert not too_big, f"more GPU workers than the trainer group's {ceiling} GPUs: {too_big}"
