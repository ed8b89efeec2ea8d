"""infra/cluster/*.yaml, infra/runtime_env.yaml and the Docker image, checked with Ray's own code.

``ray up`` merges a cluster YAML with the provider's defaults (``prepare_config``) and
validates it against ``ray/autoscaler/ray-schema.json`` (``validate_config``) before it
touches the cloud; these tests run the same two steps, then check what the schema cannot:
the node types wavray relies on, the install of wavray, token auth and spilling on every
node, and one Ray version across every file that names one.
"""

from __future__ import annotations

import copy
import re
import shlex

import jsonschema
import pytest
import ray
import yaml
from infra_specs import (
    AWS_YAML,
    CLUSTER_DIR,
    INFRA,
    KUBERAY_DIR,
    ROOT,
    launcher_worker_groups,
    load_documents,
    load_yaml,
    module_file,
    parse_entrypoint,
    prepared_cluster_config,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from pipeline.config import load_config

CLUSTER_YAMLS = sorted(CLUSTER_DIR.glob("*.yaml"))
DOCKERFILE = INFRA / "docker" / "Dockerfile"


def test_cluster_yamls_exist() -> None:
    assert AWS_YAML in CLUSTER_YAMLS, f"expected {AWS_YAML}, found {CLUSTER_YAMLS}"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_validates_against_rays_cluster_schema(path) -> None:
    config = prepared_cluster_config(path)
    validate_config(config)  # raises jsonschema.ValidationError on any mismatch


def test_the_schema_check_rejects_a_broken_copy() -> None:
    """The validation above can fail: a misspelt key and a fractional CPU count are refused."""
    raw = load_yaml(AWS_YAML)
    misspelt = copy.deepcopy(raw)
    misspelt["available_node_types"]["decoder"]["max_worker"] = misspelt["available_node_types"]["decoder"].pop(
        "max_workers"
    )
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(misspelt))
    fractional = copy.deepcopy(raw)
    fractional["available_node_types"]["decoder"]["resources"]["CPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(fractional))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_node_types_cpu_head_gpu_trainers_cpu_decoders(path) -> None:
    config = prepared_cluster_config(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise no CPU, so no task runs there"
    assert not head["resources"].get("GPU")
    groups = launcher_worker_groups(config)
    assert set(groups) == {"trainer", "decoder"}, f"{path.name}: worker types {sorted(groups)}"
    assert groups["trainer"]["resources"].get("GPU", 0) >= 1
    assert groups["decoder"]["resources"].get("GPU", 0) == 0
    for name, group in groups.items():
        assert group["resources"]["CPU"] >= 1, f"{name}: no CPU"
        assert 0 <= group["min"] <= group["max"], f"{name}: min {group['min']} > max {group['max']}"
        assert group["min"] == 0, f"{name}: should scale from zero, min_workers is {group['min']}"
    # The global cap must not hide a type's own ceiling.
    assert config["max_workers"] >= sum(g["max"] for g in groups.values())
    assert 0 < config["idle_timeout_minutes"] <= 60


def test_gcp_variant_matches_aws_groups() -> None:
    gcp = CLUSTER_DIR / "gcp.yaml"
    if not gcp.exists():
        pytest.skip("no GCP variant in infra/cluster")
    aws_groups = launcher_worker_groups(prepared_cluster_config(AWS_YAML))
    gcp_groups = launcher_worker_groups(prepared_cluster_config(gcp))
    assert set(aws_groups) == set(gcp_groups)
    for name in aws_groups:
        assert aws_groups[name]["min"] == gcp_groups[name]["min"], name
        assert aws_groups[name]["max"] == gcp_groups[name]["max"], name
        assert aws_groups[name]["resources"].get("GPU", 0) == gcp_groups[name]["resources"].get("GPU", 0), name


def _remote_checkout(config: dict) -> str:
    """The node path that file_mounts fills with the checkout `ray up` runs from."""
    mounts = {remote: local for remote, local in config["file_mounts"].items() if local in (".", "./")}
    assert len(mounts) == 1, f"expected one file mount of the checkout ('.'), got {config['file_mounts']}"
    return next(iter(mounts))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_setup_installs_wavray_from_the_synced_checkout(path) -> None:
    config = load_yaml(path)
    checkout = _remote_checkout(config)
    installs = [shlex.split(c) for c in config["setup_commands"] if "pip install" in c]
    assert installs, f"{path.name}: no pip install in setup_commands"
    argv = installs[0]
    assert "-e" in argv and argv[argv.index("-e") + 1] == checkout, argv
    assert "-c" in argv, "install with the pinned constraints"
    constraints = argv[argv.index("-c") + 1]
    assert constraints.startswith(checkout + "/")
    assert (ROOT / constraints[len(checkout) + 1:]).is_file(), f"{constraints} is not in the checkout"
    assert config["docker"]["image"], "setup runs inside a container image"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_node_starts_with_token_auth_and_a_spill_directory(path) -> None:
    config = load_yaml(path)
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the shared token"
    spill_dirs = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert len(start) == 1, f"{key}: expected one 'ray start', got {config[key]}"
        assert "RAY_AUTH_MODE=token" in start[0], f"{key}: token auth must be on"
        found = re.findall(r"--object-spilling-directory=(\S+)", start[0])
        assert found, f"{key}: no --object-spilling-directory"
        spill_dirs.update(found)
    assert len(spill_dirs) == 1, f"head and workers spill to different places: {spill_dirs}"


def test_runtime_env_is_one_ray_accepts() -> None:
    spec = load_yaml(INFRA / "runtime_env.yaml")
    unknown = set(spec) - set(RuntimeEnv.known_fields)
    assert not unknown, f"infra/runtime_env.yaml: keys Ray does not know: {sorted(unknown)}"
    RuntimeEnv(**spec)  # Ray's own type checks (env_vars str -> str, ...)
    assert (ROOT / spec["working_dir"]).resolve() == ROOT, "run from the repository root"
    excluded = set(spec.get("excludes", []))
    assert {".git", ".venv"} <= excluded, "never upload the virtualenv or the git history"
    assert not any(k.startswith("AWS_") or "TOKEN" in k or "PASSWORD" in k for k in spec.get("env_vars", {})), (
        "credentials do not belong in a runtime env: it is stored in the cluster and shown in the dashboard"
    )


def _ray_pin() -> str:
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        m = re.match(r"^ray==(\S+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError("infra/constraints.txt pins no ray version")


def test_one_ray_version_everywhere() -> None:
    """The installed ray, the pin, the images and KubeRay's rayVersion: a mismatch breaks the cluster."""
    pin = _ray_pin()
    assert ray.__version__ == pin, f"installed ray {ray.__version__}, constraints pin {pin}"
    images = {p.name: load_yaml(p)["docker"]["image"] for p in CLUSTER_YAMLS}
    images["Dockerfile"] = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    for where, image in images.items():
        assert image.startswith(f"rayproject/ray:{pin}-"), f"{where}: image {image} is not Ray {pin}"
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        for doc in load_documents(path):
            spec = doc.get("spec", {})
            cluster = spec.get("rayClusterSpec", spec) if doc["kind"] in ("RayCluster", "RayJob") else None
            if cluster is not None:
                assert cluster.get("rayVersion") == pin, f"{path.name}: rayVersion {cluster.get('rayVersion')}"


def test_dockerfile_installs_wavray_where_the_rayjobs_run_it() -> None:
    text = DOCKERFILE.read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)
    assert workdir, "Dockerfile: no WORKDIR"
    assert re.search(r"pip install .*-c infra/constraints.txt .*-e \.", text), "install wavray with the pins"
    for path in sorted(KUBERAY_DIR.glob("rayjob-*.yaml")):
        for doc in load_documents(path):
            env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert env["working_dir"] == workdir[-1], f"{path.name}: working_dir {env['working_dir']} != {workdir[-1]}"
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def _readme_job_commands() -> list[str]:
    """Every ``python -m jobs.X ...`` command of infra/README.md's shell blocks, continuations joined."""
    text = (INFRA / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "python -m jobs." in line:
                commands.append(line[line.index("python -m jobs."):])
    return commands


def test_readme_job_commands_resolve() -> None:
    """The commands the README tells people to paste name real jobs, configs and config keys."""
    commands = _readme_job_commands()
    assert commands, "infra/README.md shows no job command"
    for command in commands:
        module, config, overrides = parse_entrypoint(command)
        assert module_file(module).is_file(), f"README: {module} does not exist"
        load_config(ROOT / config, overrides)  # unknown keys or bad values raise
