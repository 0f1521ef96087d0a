"""Flow `evaluate`: a checkpoint's val bits per byte and HellaSwag accuracy, recorded in the catalog's `evals` table
with a table artifact per evaluation. Run: `langpwt evaluate --checkpoint latest --tasks bpb,hellaswag` or
`python -m flows.evaluate --checkpoint latest --tasks bpb --device cpu`.
Trade-off: each evaluation task loads the checkpoint itself, a repeated read, so that no model object crosses a
task boundary, where Prefect would try to hash or persist it."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from tasks.params import EvaluateParams

@dataclass(frozen=True)
class Target:
    """A checked checkpoint: complete, and trained with the home's tokenizer."""
    step_dir: str
    tokenizer: str
    run_id: str | None
    step: int | None


def check_inputs(params: EvaluateParams) -> Target:
    """Everything that can be refused before any model runs; one-line errors (EvalError, HellaSwagError)."""
    from model.evaluate import check_checkpoint
    from model.generate import pick_device
    from storage.checkpoints import resolve
    from tasks.hellaswag import read_items

    pick_device(params.device)
    home = params.home_dir()
    step_dir = resolve(params.checkpoint, home)
    cfg = check_checkpoint(step_dir, home.tokenizer)
    if "hellaswag" in params.tasks and params.hellaswag_data:
        read_items(params.hellaswag_data)
    return Target(str(step_dir), str(home.tokenizer), cfg.get("run_id"), cfg.get("step"))


def artifact_key(result: dict) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"eval-{result['run_id']}-{result['step']}-{result['task']}".lower()).strip("-")


@task(name="eval-check", cache_policy=NONE)
def check_task(params: EvaluateParams) -> Target:
    return check_inputs(params)


@task(name="eval-bpb", cache_policy=NONE)
def bpb_task(target: Target, params: EvaluateParams) -> dict:
    from model.evaluate import load_for_eval, run_bpb, val_paths

    loaded = load_for_eval(Path(target.step_dir), Path(target.tokenizer), params.device)
    return run_bpb(loaded, val_paths(params.home_dir(), loaded.tokenizer_sha256), params.batch_size)


@task(name="eval-hellaswag-data", cache_policy=NONE)
def hellaswag_data_task(params: EvaluateParams) -> str:
    from tasks.hellaswag import fetch

    return params.hellaswag_data or str(fetch(params.home_dir()))


@task(name="eval-hellaswag", cache_policy=NONE)
def hellaswag_task(target: Target, data: str, params: EvaluateParams) -> dict:
    from model.evaluate import load_for_eval
    from model.hellaswag import run_hellaswag

    loaded = load_for_eval(Path(target.step_dir), Path(target.tokenizer), params.device)
    return run_hellaswag(loaded, Path(data), params.limit, max(1, params.batch_size // 4))


@task(name="eval-record", cache_policy=NONE)
def record_task(params: EvaluateParams, result: dict) -> None:
    """Catalog rows and the table artifact of one finished evaluation."""
    from storage import eval_catalog

    eval_catalog.record(params.home_dir(), result)
    create_table_artifact(key=artifact_key(result), table=eval_catalog.table_rows(result),
                          description=f"{result['task']} of {result['checkpoint']} on {result['device']} "
                                      f"({result['split_size']:,} in the data, sha256 {result['split_id'][:12]})")


@flow(name="evaluate", log_prints=True)
def evaluate(params: EvaluateParams) -> dict:
    """Run each task in `params.tasks` on the checkpoint; each is recorded as soon as it has completed."""
    log = get_run_logger()
    target = check_task(params)
    results = []
    for name in params.tasks:
        if name == "bpb":
            res = bpb_task(target, params)
        else:
            res = hellaswag_task(target, hellaswag_data_task(params), params)
        record_task(params, res)
        log.info(f"{name}: " + ", ".join(f"{m['metric']} {m['value']:.4f}" for m in res["metrics"]))
        results.append(res)
    return {"checkpoint": target.step_dir, "run_id": target.run_id, "step": target.step, "results": results}


if __name__ == "__main__":
    import argparse

    from flows.cli.params import add_model_args, build

    p = argparse.ArgumentParser(prog="python -m flows.evaluate", description="flow `evaluate` on one checkpoint")
    p.add_argument("--home", help="state folder (default $LANGPWT_HOME or ./.langpwt)")
    add_model_args(p, EvaluateParams, exclude={"home"}, parsers={"device": str})
    a = p.parse_args()
    out = evaluate(build(EvaluateParams, a, home=a.home))
    print(json.dumps(out, indent=1, default=str))
    sys.exit(0)
