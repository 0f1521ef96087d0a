"""Flow `train`: plan the run, train in a child process (torchrun on several GPUs), write the report; the Prefect
tasks and artifacts around tasks/train.py. The parameters are one field per trainer flag, generated, so the run
form shows every knob; the price is a model built at import rather than a class one can read top to bottom.
Run: `langpwt train --preset tiny` or `python -m flows.train --preset tiny --max-steps 60`."""
from __future__ import annotations

import re
import sys
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, create_model, model_validator

from model.args import flag_fields
from storage import training_catalog as tc
from storage.paths import Home
from tasks.train import Recorder, TrainPlan, export_run, plan_run, report, run_child


class _TrainBase(BaseModel):
    """What the flow needs besides the trainer's flags."""
    preset: str = Field("seed", description="seed | tiny | gpt2 (a resumed run keeps its checkpoint's)")
    home: Optional[str] = Field(None, description="state folder; default $LANGPWT_HOME or ./.langpwt")
    run_id: Optional[str] = Field(None, description="run folder name; default preset-timestamp")
    resume: bool = Field(False, description="continue the newest run (or run_id) up to max_steps")
    nproc: Optional[int] = Field(None, ge=1, description="processes (GPUs); default: every visible GPU")

    def trainer_overrides(self) -> dict:
        """The trainer flags that were set (None: the preset's or the checkpoint's value)."""
        base = set(_TrainBase.model_fields)
        return {k: v for k, v in self.model_dump().items() if k not in base and v is not None}

    @model_validator(mode="after")
    def _valid_config(self):
        # a bad value is refused before anything runs, with the flag's name (TrainConfig.validate's message)
        from model.config import preset

        preset(self.preset).override(self.trainer_overrides())
        return self


TrainParams = create_model(
    "TrainParams", __base__=_TrainBase,
    __doc__="The flow's parameters: the run's own, then one per trainer flag (unset: the preset's or the checkpoint's).",
    **{name: (Optional[tp], Field(None, description=help_)) for name, tp, help_ in flag_fields()})


class TrainingFailed(RuntimeError):
    pass


def artifact_key(run_id: str, what: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"train-{run_id}-{what}".lower()).strip("-")


def _publish_evals(run_id: str, evals: list[dict]) -> None:
    create_table_artifact(key=artifact_key(run_id, "metrics"), table=evals,
                          description=f"run {run_id}: metrics at each evaluation")


def _publish_checkpoint(run_id: str, ev: dict) -> None:
    val = f"{ev['val_loss']:.4f}" if ev.get("val_loss") is not None else "—"
    create_markdown_artifact(
        key=artifact_key(run_id, f"checkpoint-{ev['step']:06d}"),
        description=f"checkpoint of run {run_id} at step {ev['step']}",
        markdown=(f"### Checkpoint step {ev['step']}\n\n| step | val loss | path | sha256 | size |\n"
                  f"|---|---|---|---|---|\n| {ev['step']} | {val} | [{ev['path']}](file://{ev['path']}) "
                  f"| `{ev['sha256']}` | {ev['size_bytes'] / 1e6:.1f} MB |\n"))


@task(name="train-plan")
def plan_task(home: str | None, preset: str, overrides: dict, resume: bool, run_id: str | None,
              nproc: int | None) -> TrainPlan:
    plan = plan_run(Home.from_env(home).ensure(), preset, overrides, resume, run_id, nproc)
    get_run_logger().info(f"run {plan.run_id}: {plan.nproc} process(es), overrides {plan.overrides}")
    return plan


@task(name="train-model")
def train_task(plan: TrainPlan) -> dict:
    log = get_run_logger()
    log.info("command: " + " ".join(plan.command))
    rec = Recorder(plan, log, str(flow_run.id) if flow_run.id else None,
                   on_evals=lambda evals: _publish_evals(plan.run_id, evals),
                   on_checkpoint=lambda ev: _publish_checkpoint(plan.run_id, ev))
    code = run_child(plan.command, rec, log.info)
    return rec.finish(code)


@task(name="train-report")
def report_task(plan: TrainPlan) -> str:
    md = report(Home.from_env(plan.home), plan.run_id)
    create_markdown_artifact(key=artifact_key(plan.run_id, "report"), markdown=md,
                             description=f"final report of run {plan.run_id}")
    return str(Home.from_env(plan.home).run_dir(plan.run_id) / "report.md")


@task(name="train-export")
def export_task(plan: TrainPlan) -> str | None:
    """The run's best checkpoint as a Hugging Face folder, linked as an artifact."""
    out = export_run(Home.from_env(plan.home), plan.run_id)
    if out is None:
        return None
    create_link_artifact(key=artifact_key(plan.run_id, "hf"), link=out.resolve().as_uri(),
                         link_text=f"{plan.run_id}: Hugging Face GPT-2 folder",
                         description=f"run {plan.run_id}'s best checkpoint for transformers, lm-evaluation-harness, vLLM")
    return str(out)


@task(name="train-reconcile")
def reconcile_task(home: str | None) -> dict:
    """Catalog rows for whatever a killed or waiting flow left only on disk (runs, checkpoints, metrics)."""
    h = Home.from_env(home)
    added = tc.reconcile_runs(h) if h.runs.is_dir() else {}
    if any(added.values()):
        get_run_logger().info(f"catalog reconciled with {h.runs}: {added}")
    return added


@flow(name="train", log_prints=True)
def train(params: TrainParams) -> dict:
    reconcile_task(params.home)
    plan = plan_task(params.home, params.preset, params.trainer_overrides(), params.resume, params.run_id,
                     params.nproc)
    result = train_task(plan)
    result["report"] = report_task(plan)
    reconcile_task(params.home)
    if result["exit_code"]:
        raise TrainingFailed(f"run {plan.run_id}: {result['error']}")
    result["hf"] = export_task(plan)
    return result


if __name__ == "__main__":
    import argparse

    from model.args import add_config_args, overrides

    p = argparse.ArgumentParser(prog="python -m flows.train")
    p.add_argument("--home", help="state folder (default $LANGPWT_HOME or ./.langpwt)")
    p.add_argument("--run-id", help="run folder name (default: preset-timestamp)")
    p.add_argument("--resume", action="store_true", help="continue the newest run (or --run-id)")
    p.add_argument("--nproc", type=int, help="processes/GPUs (default: every visible GPU)")
    add_config_args(p)
    a = p.parse_args()
    out = train(TrainParams(preset=a.preset or "seed", home=a.home, run_id=a.run_id, resume=a.resume,
                            nproc=a.nproc, **overrides(a)))
    print(out)
    sys.exit(0)
