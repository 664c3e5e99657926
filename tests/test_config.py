"""The typed config: YAML + dotted overrides, errors that name the key, range checks, help text."""

import subprocess
import sys

import pytest

from kard_ray.config import ConfigError, KardConfig, field_help, load_config

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_prints_the_resolved_tree():
    out = subprocess.run([sys.executable, "-c", "from kard_ray.config import load_config; print(load_config('configs/demo.yaml'))"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "run_dir: runs/demo" in out and "student:" in out and "lr: 0.0015" in out


def test_overrides_are_typed():
    cfg = load_config(str(REPO / "configs/demo.yaml"), ["student.lr=3e-4", "student.max_steps=7", "knowledge.bm25.stemmer=null",
                                                        "methods=[rd,kard_bm25]", "eval.temperature=1"])
    assert cfg.student.lr == pytest.approx(3e-4) and cfg.student.max_steps == 7
    assert cfg.knowledge.bm25.stemmer is None and cfg.methods == ["rd", "kard_bm25"]
    assert isinstance(cfg.eval.temperature, float)


@pytest.mark.parametrize("override, message", [
    ("student.lrr=1", "unknown config key 'student.lrr'; did you mean 'student.lr'?"),
    ("studnet.lr=1", "did you mean 'student'?"),
    ("student.lr=fast", "student.lr: expected a number"),
    ("student.lr=-1", "student.lr: must be > 0"),
    ("knowledge.retriever=dens", "did you mean 'dense'?"),
    ("student.batch_size=2.5", "student.batch_size: expected an integer"),
    ("reranker.tau_min=0", "reranker.tau_min: must be > 0"),
    ("methods=[ft,kard]", "unknown method 'kard'"),
    ("student", "expected key=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(str(REPO / "configs/demo.yaml"), [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("student:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'student.learning_rate'"):
        load_config(str(p))


def test_cross_field_requirements():
    with pytest.raises(ConfigError, match="teacher.import_path: required"):
        load_config(None, ["teacher.backend=import"])
    with pytest.raises(ConfigError, match="data.train_path: required"):
        load_config(None, ["data.dataset=medqa"])


def test_every_field_has_help_and_roundtrips():
    rows = field_help()
    assert len(rows) > 80
    assert all(h for _, _, h in rows), [k for k, _, h in rows if not h]
    cfg = load_config(str(REPO / "configs/demo.yaml"))
    import yaml
    from kard_ray.config import config_from_dict
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert KardConfig().section_hash("student") != cfg.section_hash("student")


# every pipeline config shipped (serve.yaml is a Ray Serve config, checked in test_serve_unit)
@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if p.stem != "serve"))
def test_shipped_configs_load(name):
    path = REPO / "configs" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not written yet")
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "jobs/distill.py" in first, "each config starts with the command that runs it"
    load_config(str(path))


def test_relative_local_paths_become_absolute_uris_and_hub_names_do_not(tmp_path, monkeypatch):
    """Ray workers (Ray Train's above all) run in another directory: every local path the run reads or
    writes is made absolute against the command's directory before the pipeline starts."""
    from kard_ray.config import resolve_local_paths

    (tmp_path / "my_model").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(REPO / "configs/demo.yaml"), [
        "run_dir=runs/x", "data.train_path=data/train.jsonl", "data.test_path=s3://bucket/test.jsonl",
        "knowledge.corpus_paths=[corpus/a.jsonl,gs://b/c.jsonl]", "student.model=my_model",
        "reranker.model=michiyasunaga/LinkBERT-base"])
    r = resolve_local_paths(cfg)
    assert r.run_dir == str(tmp_path / "runs" / "x") and cfg.run_dir == "runs/x"  # a copy; the input is kept
    assert r.data.train_path == str(tmp_path / "data" / "train.jsonl")
    assert r.data.test_path == "s3://bucket/test.jsonl"
    assert r.knowledge.corpus_paths == [str(tmp_path / "corpus" / "a.jsonl"), "gs://b/c.jsonl"]
    assert r.student.model == str(tmp_path / "my_model")  # exists here: a path
    assert r.reranker.model == "michiyasunaga/LinkBERT-base"  # does not exist here: a Hub name
    assert resolve_local_paths(r) == r


def test_tracking_store_defaults_to_the_run_directory_and_a_uri_run_needs_one():
    from kard_ray.tracking import tracking_uri

    local = load_config(str(REPO / "configs" / "demo.yaml"), ["run_dir=/tmp/some_run", "tracking.mlflow=true"])
    assert tracking_uri(local) == ("sqlite:////tmp/some_run/mlflow.db", "file:///tmp/some_run/mlartifacts")
    remote = load_config(str(REPO / "configs" / "demo.yaml"), ["run_dir=s3://bucket/run", "tracking.mlflow=true"])
    with pytest.raises(ValueError, match="tracking.uri"):
        tracking_uri(remote)
    given = load_config(str(REPO / "configs" / "demo.yaml"), ["run_dir=s3://bucket/run", "tracking.uri=http://mlflow:5000"])
    assert tracking_uri(given) == ("http://mlflow:5000", None)


def test_readme_configuration_reference_is_the_generated_one():
    """README's table is `kard-ray config --reference`: a field added or re-documented shows up there."""
    import subprocess
    import sys

    ref = subprocess.run([sys.executable, "-m", "kard_ray.cli", "config", "--reference"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout.strip().splitlines()
    readme = (REPO / "README.md").read_text().splitlines()
    start = readme.index(ref[0])
    table = readme[start:start + len(ref)]
    after = readme[start + len(ref):start + len(ref) + 1]
    assert table == ref and not (after and after[0].startswith("|")), "README.md: regenerate with `kard-ray config --reference`"
