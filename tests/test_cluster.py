"""Offline checks of the cluster configs: nothing here starts Ray or calls a cloud API.

* cluster/aws.yaml, cluster/gcp.yaml: filled with the provider defaults by Ray's own
  ``prepare_config`` and validated by Ray's own ``validate_config`` (ray-schema.json), as
  ``ray up`` does before it talks to the cloud.
* cluster/kuberay/*.yaml: validated against the ray.io/v1 openAPIV3Schema kept in
  tests/data/crds/ (see its README.md), strict about unknown fields like ``kubectl apply``.
* cluster/serve_config.yaml and the RayService's serveConfigV2: ``ServeDeploySchema``, equal.
* One Ray version and one image tag across Dockerfile, YAMLs and pyproject.toml.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = Path(__file__).resolve().parent / "data" / "crds"

LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
KUBERAY = {
    "raycluster.yaml": ("RayCluster", "raycluster.v1.schema.yaml"),
    "rayjob.yaml": ("RayJob", "rayjob.v1.schema.yaml"),
    "rayservice.yaml": ("RayService", "rayservice.v1.schema.yaml"),
}
SCHEMA_FILES = [
    "k8s_core_v1.json",
    "raycluster.v1.schema.yaml",
    "rayjob.v1.schema.yaml",
    "rayservice.v1.schema.yaml",
]
DEPLOYMENTS = {"Retriever", "Reranker", "Generator", "Ingress"}
PROJECT_IMAGE = re.compile(r"^[a-z0-9.\-/]+/kard-ray:(?P<tag>\S+)$")


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _all_cluster_yamls() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


# ---------------------------------------------------------------- launcher configs (ray up)


def _prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(_yaml(CLUSTER / name)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_rays_schema(name):
    from ray.autoscaler._private.util import validate_config

    config = _prepared(name)  # merged with ray/autoscaler/<provider>/defaults.yaml
    validate_config(config)  # ray/autoscaler/ray-schema.json + Ray's own cross-field checks

    assert config["provider"]["type"] == name.removesuffix(".yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"].get("CPU") == 0
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    # A CPU type, a one-GPU type and a multi-GPU type, all able to scale to zero.
    gpus = sorted(v["resources"].get("GPU", 0) for v in workers.values())
    assert gpus[0] == 0 and 1 in gpus and gpus[-1] >= 2, gpus
    for spec in workers.values():
        assert 0 == spec["min_workers"] < spec["max_workers"]
    assert sum(v["max_workers"] for v in workers.values()) == config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    # The defaults' setup commands (a nightly wheel, ...) must not leak in: the image has it all.
    assert config["setup_commands"] == []
    assert PROJECT_IMAGE.match(config["docker"]["image"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_with_unknown_key_is_refused(name):
    from ray.autoscaler._private.util import validate_config

    config = _prepared(name)
    config["available_node_types"]["head"]["max_worker"] = 0  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("path", _all_cluster_yamls(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_yaml_starts_with_the_command_that_uses_it(path):
    first = path.read_text().splitlines()[0]
    rel = str(path.relative_to(ROOT))
    assert first.startswith("# ") and rel in first, first


# ---------------------------------------------------------------- KubeRay manifests


@pytest.fixture(scope="module")
def crd_registry() -> Registry:
    resources = []
    for name in SCHEMA_FILES:
        text = (CRDS / name).read_text()
        contents = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
        resources.append((name, DRAFT202012.create_resource(contents)))
    return Registry().with_resources(resources)


def _errors(manifest: dict, schema_file: str, registry: Registry) -> list[str]:
    validator = jsonschema.Draft202012Validator({"$ref": schema_file}, registry=registry)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]


def _cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[manifest["kind"]]


def _pod_specs(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifest_validates_against_crd_schema(name, crd_registry):
    kind, schema_file = KUBERAY[name]
    manifest = _yaml(CLUSTER / "kuberay" / name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    assert _errors(manifest, schema_file, crd_registry) == []

    cluster = _cluster_spec(manifest)
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    assert any("nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]
               for g in groups), "a CPU worker group"
    for group in groups:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    for pod, spec in _pod_specs(cluster):
        ray_container = spec["containers"][0]  # KubeRay runs Ray in the first container
        limits = ray_container["resources"]["limits"]
        requests = ray_container["resources"].get("requests", {})
        # The autoscaler sizes a group from its pod's cpu/memory (and GPU) resources.
        assert {"cpu", "memory"} <= limits.keys(), pod
        if "nvidia.com/gpu" in limits:  # an extended resource: request == limit
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
            assert int(limits["nvidia.com/gpu"]) >= 1, pod
        # The object store lives in /dev/shm; the container default (64 MB) is far too small.
        mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", pod


def test_kuberay_gpu_groups_cover_each_stage():
    cluster = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    gpus = sorted(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in cluster["workerGroupSpecs"]
    )
    assert gpus[0] == 0 and 1 in gpus and gpus[-1] >= 2, gpus
    job = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]
    assert job["rayClusterSpec"] == cluster  # the job's cluster is the same shape
    assert job["shutdownAfterJobFinishes"] is True
    assert re.fullmatch(
        r"python jobs/distill\.py --config configs/strategyqa\.yaml run_dir=(s3|gs)://\S+",
        job["entrypoint"],
    ), job["entrypoint"]
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"] == _dockerfile_workdir()


def _mutations():
    """(mutation, the error it must cause): each breaks one rule of the CRD schema."""

    def drop_group_name(m):
        del m["spec"]["workerGroupSpecs"][0]["groupName"]

    def min_replicas_as_string(m):
        m["spec"]["workerGroupSpecs"][0]["minReplicas"] = "0"

    def gpu_quantity_not_a_quantity(m):
        m["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"][
            "limits"]["nvidia.com/gpu"] = "one"

    def misspelt_field(m):
        m["spec"]["workerGroupSpec"] = m["spec"].pop("workerGroupSpecs")

    def container_without_name(m):
        del m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]

    def no_head_group(m):
        del m["spec"]["headGroupSpec"]

    def bad_upscaling_mode(m):
        m["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"

    return [
        (drop_group_name, "spec/workerGroupSpecs/0: 'groupName' is a required property"),
        (min_replicas_as_string, "spec/workerGroupSpecs/0/minReplicas: '0' is not of type 'integer'"),
        (gpu_quantity_not_a_quantity, "limits/nvidia.com/gpu: 'one' does not match"),
        (misspelt_field, "('workerGroupSpec' was unexpected)"),
        (container_without_name, "containers/0: 'name' is a required property"),
        (no_head_group, "spec: 'headGroupSpec' is a required property"),
        (bad_upscaling_mode, "'Fast' is not one of ['Default', 'Aggressive', 'Conservative']"),
    ]


@pytest.mark.parametrize(
    "mutate,expected", [pytest.param(f, e, id=f.__name__) for f, e in _mutations()]
)
def test_broken_raycluster_fails_validation(mutate, expected, crd_registry):
    manifest = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    mutate(manifest)
    errors = _errors(manifest, "raycluster.v1.schema.yaml", crd_registry)
    assert len(errors) == 1 and expected in errors[0], errors


def test_broken_cluster_inside_rayjob_and_rayservice_fails(crd_registry):
    job = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert _errors(job, "rayjob.v1.schema.yaml", crd_registry)
    service = _yaml(CLUSTER / "kuberay" / "rayservice.yaml")
    service["spec"]["serveConfigV2"] = {"applications": []}  # must be a YAML string
    assert _errors(service, "rayservice.v1.schema.yaml", crd_registry)


# ---------------------------------------------------------------- Serve config


def _serve_schema():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


def test_serve_config_parses_and_matches_rayservice():
    schema = _serve_schema()
    config = _yaml(CLUSTER / "serve_config.yaml")
    service = _yaml(CLUSTER / "kuberay" / "rayservice.yaml")
    v2_text = service["spec"]["serveConfigV2"]
    assert isinstance(v2_text, str)
    v2 = yaml.safe_load(v2_text)
    parsed_file = schema.model_validate(config)
    parsed_v2 = schema.model_validate(v2)
    assert v2 == config
    assert parsed_v2.model_dump(exclude_unset=True) == parsed_file.model_dump(exclude_unset=True)

    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 60}
    (app,) = parsed_file.applications
    assert (app.name, app.route_prefix, app.import_path) == ("kard", "/", "kard_ray.serve:build_app")
    assert re.fullmatch(r"(s3|gs)://\S+", app.args["run_dir"])
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == DEPLOYMENTS
    from ray.serve.config import AutoscalingConfig

    from kard_ray.config import load_config
    from kard_ray.serve.app import _override_text, deployment_options

    # replicas come from the app's args (kard_ray config keys), as the Serve controller builds the app
    cfg = load_config(None, [_override_text(k, v) for k, v in app.args.items() if k != "run_dir"])
    opts = deployment_options(cfg, "kard_reranker", gated=True)
    for name, o in opts.items():
        auto = AutoscalingConfig(**o["autoscaling_config"])  # what Serve checks at deploy time
        assert 1 <= auto.min_replicas <= auto.max_replicas, name
        assert auto.target_ongoing_requests > 0, name
    assert opts["Generator"]["autoscaling_config"]["max_replicas"] == 4
    assert deployments["Generator"].ray_actor_options.num_gpus == 1

    # The GPU worker group can hold every Generator replica.
    gpu_groups = [g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert sum(g["maxReplicas"] for g in gpu_groups) >= cfg.serve.generator.max_replicas


def _serve_breakages():
    def deployment_without_name(c):
        del c["applications"][0]["deployments"][0]["name"]

    def negative_gpus(c):
        c["applications"][0]["deployments"][2]["ray_actor_options"]["num_gpus"] = -1

    def port_not_a_number(c):
        c["http_options"]["port"] = "eight thousand"

    return [deployment_without_name, negative_gpus, port_not_a_number]


@pytest.mark.parametrize("mutate", _serve_breakages(), ids=lambda f: f.__name__)
def test_broken_serve_config_is_refused(mutate):
    from pydantic import ValidationError

    config = _yaml(CLUSTER / "serve_config.yaml")
    mutate(config)
    with pytest.raises(ValidationError):
        _serve_schema().model_validate(config)


# ---------------------------------------------------------------- image and versions


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _dockerfile_workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", _dockerfile(), flags=re.M)
    return workdir


def _base_image() -> tuple[str, str, str]:
    (base,) = re.findall(r"^FROM\s+(\S+)", _dockerfile(), flags=re.M)
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<platform>gpu|cu\d+)", base)
    assert m, f"not an official Ray GPU image tag: {base}"
    return m["ray"], m["py"], base.split(":", 1)[1]


def _images_in(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_images_in(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_images_in(value))
    return found


def test_image_tags_and_ray_versions_agree():
    ray_version, py, base_tag = _base_image()
    assert py == "311"
    assert f"ray.__version__ == '{ray_version}'" in _dockerfile()

    for path in _all_cluster_yamls():
        doc = _yaml(path)
        images = _images_in(doc)
        if path.name == "serve_config.yaml":
            assert images == []
            continue
        assert images, f"{path} names no image"
        for image in images:
            m = PROJECT_IMAGE.match(image)
            assert m and m["tag"] == base_tag, f"{path}: {image} (want tag {base_tag})"
        if doc.get("apiVersion") == "ray.io/v1":
            assert _cluster_spec(doc)["rayVersion"] == ray_version, path

    # The Dockerfile's own build command names the same image.
    assert all(m == base_tag for m in re.findall(r"kard-ray:(\S+)", _dockerfile().splitlines()[0]))


def test_versions_match_pyproject():
    path = ROOT / "pyproject.toml"
    if not path.exists():
        pytest.skip("pyproject.toml not written yet")
    from packaging.requirements import Requirement

    project = tomllib.loads(path.read_text())["project"]
    deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    ray_version, py, _ = _base_image()
    assert str(deps["ray"].specifier) == f"=={ray_version}"
    assert {"data", "train", "serve"} <= deps["ray"].extras
    assert deps["ray"].specifier.contains(ray_version)
    # Python of the image is allowed by the project.
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(project.get("requires-python", "")).contains(f"{py[0]}.{py[1:]}")
    # torch as pinned in the Dockerfile is allowed by the project.
    (torch_pin,) = re.findall(r'"torch==([^"]+)"', _dockerfile())
    assert deps["torch"].specifier.contains(torch_pin), (torch_pin, str(deps["torch"].specifier))
    # The Dockerfile installs the `gpu` extra, which must exist and pin Ray's llm extra alike.
    assert re.search(r'pip install [^\n]*"\.\[gpu\]"', _dockerfile())
    gpu = [Requirement(d) for d in project.get("optional-dependencies", {}).get("gpu", [])]
    assert gpu, "pyproject.toml has no `gpu` extra"
    for req in gpu:
        if req.name == "ray":
            assert str(req.specifier) == f"=={ray_version}"


def test_dockerfile_copies_the_package_and_dockerignore_keeps_outputs_out():
    text = _dockerfile()
    copied = set()
    for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        copied.update(p.rstrip("/") for p in parts[:-1])
    assert {"kard_ray", "jobs", "configs", "pyproject.toml", "README.md"} <= copied
    # torch is installed before the package.
    assert text.index('"torch==') < text.index('".[gpu]"')

    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for pattern in [".git", "runs", ".venv", "**/__pycache__", "**/*.parquet", "*.whl", ".whl", ".gl"]:
        assert pattern in ignored, pattern
    for needed in copied:
        assert needed not in ignored, needed


def test_dockerfile_gives_every_node_the_serve_proxy_environment():
    """The image's ENV is what `kard-ray serve` sets for the Ray it starts (kard_ray.serve.proxy)."""
    from kard_ray.serve.proxy import proxy_environment

    env = dict(re.findall(r"(RAY_SERVE_[A-Z_]+)=(\S+)", _dockerfile()))
    assert env == proxy_environment(calls_by_value=True)


# ---------------------------------------------------------------- node-type shapes, one per type


def _kuberay_group_type(group_name: str) -> str:
    return {"cpu": "cpu_worker"}.get(group_name, group_name.replace("-", "_"))


def test_node_types_have_the_same_shape_in_every_cluster_config():
    """cpu_worker / gpu_small / gpu_multi mean the same thing in every config: the same GPUs per node and the
    same min/max, a head without tasks. tests/test_distributed.py autoscales aws.yaml's shapes with Ray's fake
    multi-node provider, so this keeps the other configs on what that test exercised."""
    shapes = {}
    for name in LAUNCHER_CONFIGS:
        doc = _yaml(CLUSTER / name)
        types = doc["available_node_types"]
        assert types[doc["head_node_type"]]["resources"] == {"CPU": 0}, name
        shapes[name] = {t: (spec["resources"].get("GPU", 0), spec["min_workers"], spec["max_workers"],
                            spec["resources"]["CPU"])
                        for t, spec in types.items() if t != doc["head_node_type"]}
    aws = shapes["aws.yaml"]
    for name, s in shapes.items():
        assert {t: v[:3] for t, v in s.items()} == {t: v[:3] for t, v in aws.items()}, name
    for kind, manifest in [("raycluster.yaml", _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]),
                           ("rayjob.yaml", _yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["rayClusterSpec"])]:
        assert manifest["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", kind
        groups = {}
        for g in manifest["workerGroupSpecs"]:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            groups[_kuberay_group_type(g["groupName"])] = (int(limits.get("nvidia.com/gpu", 0)), g["minReplicas"],
                                                          g["maxReplicas"], float(limits["cpu"]))
        assert {t: v[:3] for t, v in groups.items()} == {t: v[:3] for t, v in aws.items()}, kind
        for t, (_, _, _, cpus) in groups.items():
            assert cpus <= aws[t][3], (kind, t, "a pod must fit the launcher's node of its type")


def test_the_qwen_student_config_fits_the_clusters_gpu_nodes():
    """configs/strategyqa_qwen.yaml (a decoder-only student on 4 GPU workers, DeepSpeed ZeRO-2, bf16) asks
    for what the shipped clusters can start: its 4 workers fit on one gpu_multi node (NCCL inside a node)
    or across gpu_small nodes, and each evaluation actor's GPUs fit one node."""
    from kard_ray.config import load_config

    cfg = load_config(str(ROOT / "configs" / "strategyqa_qwen.yaml"))
    s = cfg.student
    assert (s.architecture, s.strategy, s.zero_stage, s.bf16, s.use_gpu, s.num_workers) == ("causal", "deepspeed", 2,
                                                                                              True, True, 4)
    assert (cfg.eval.engine, cfg.eval.num_gpus_per_actor) == ("vllm", 1)
    for name in LAUNCHER_CONFIGS:
        types = _yaml(CLUSTER / name)["available_node_types"]
        gpu = {t: v["resources"] for t, v in types.items() if v["resources"].get("GPU")}
        per_node = {t: min(r["GPU"], r["CPU"] // s.cpus_per_worker) for t, r in gpu.items()}
        assert any(n >= s.num_workers for n in per_node.values()), (name, per_node)
        assert sum(n * types[t]["max_workers"] for t, n in per_node.items()) >= s.num_workers + cfg.eval.num_actors
        assert max(r["GPU"] for r in gpu.values()) >= cfg.eval.num_gpus_per_actor, name
