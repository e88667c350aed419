"""One source for config docs: the pydantic schema's descriptions feed `--help` and configs/defaults.yaml."""

import contextlib
import io
import re
import typing

import pytest
import yaml
from pydantic import BaseModel

from saerl_ray.cli import main
from saerl_ray.core.config import (
    DEFAULTS_COMMAND,
    DEFAULTS_YAML,
    ClusterConfig,
    RunConfig,
    defaults_yaml,
    load_config,
)


def models_and_fields(model: type[BaseModel], prefix: str = ""):
    """Every section model reachable from `model` (list items included) and every leaf (path, field)."""
    models, leaves = [model], []
    for name, field in model.model_fields.items():
        ann = field.annotation
        item = typing.get_args(ann)[0] if typing.get_origin(ann) is list else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            m, l = models_and_fields(ann, f"{prefix}{name}.")
            models, leaves = models + m, leaves + l
            continue
        leaves.append((f"{prefix}{name}", field))
        if isinstance(item, type) and issubclass(item, BaseModel):  # ingest.inputs entries
            m, l = models_and_fields(item, f"{prefix}{name}[].")
            models, leaves = models + m, leaves + l
    return models, leaves


MODELS, LEAVES = models_and_fields(RunConfig)
FLAGS = [(path, field) for path, field in LEAVES if "[]" not in path]


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_defaults_yaml_on_disk_is_the_generated_one():
    assert DEFAULTS_YAML.read_text() == defaults_yaml(), (
        f"{DEFAULTS_YAML} is out of date with saerl_ray/core/config.py: regenerate it with `{DEFAULTS_COMMAND}`")


def test_every_field_and_section_is_documented():
    assert len(FLAGS) > 100 and any("[]" in path for path, _ in LEAVES)
    undocumented = [path for path, field in LEAVES if not (field.description or "").strip()]
    assert not undocumented, f"fields without Field(description=...): {undocumented}"
    no_doc = [m.__name__ for m in MODELS if not (m.__doc__ or "").strip()]
    assert not no_doc, f"section models without a docstring: {no_doc}"


@pytest.fixture(scope="module")
def run_help():
    """`saerl-ray run --help`, whitespace squashed (COLUMNS wide: argparse would wrap at the terminal width)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        mp.setenv("COLUMNS", "10000")
        main(["run", "--help"])
    assert exit_.value.code == 0
    return squash(out.getvalue())


def test_run_help_shows_every_description(run_help):
    missing = [path for path, field in FLAGS if f"--{path} V {squash(field.description)} (default: " not in run_help]
    assert not missing, f"--help lacks these flags' descriptions: {missing}"


@pytest.mark.parametrize("path, tail", [
    ("sampler.mode", "(default: online; one of static, online)"),
    ("model.dtype", "(default: float32; one of float32, bfloat16, float16)"),
    ("features.codes", "(default: [pooled, last, mean, halves]; each one of pooled, last, mean, halves)"),
    ("sae.k", "(default: 32)"),
    ("ray.address", "(default: null)"),
    ("train.learning_rate", "(default: 1.0e-06)"),
    ("ingest.inputs", "(default: [])"),
])
def test_run_help_shows_default_and_choices(run_help, path, tail):
    field = dict(FLAGS)[path]
    assert f"--{path} V {squash(field.description)} {tail}" in run_help


def test_run_help_heads_each_section_with_its_docstring(run_help):
    assert f"config fields, signals.cluster (override the YAML): {ClusterConfig.__doc__}" in run_help


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        out |= flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "columns" else {f"{prefix}{k}"}
    return out


def test_defaults_yaml_round_trips_to_the_default_config():
    text = defaults_yaml()
    tree = yaml.safe_load(text)
    assert flat_keys(tree) == {path for path, _ in FLAGS}, "every field must appear with its default"
    assert RunConfig.model_validate(tree) == RunConfig()
    assert load_config(DEFAULTS_YAML) == RunConfig()
    comments = squash(" ".join(line.split("# ", 1)[1] for line in text.splitlines() if "# " in line))
    missing = [path for path, field in LEAVES if squash(field.description) not in comments]
    assert not missing, f"defaults.yaml lacks these descriptions: {missing}"
