"""Flow `train`: plan the run, train in a child process (torchrun on several GPUs), write the report.
Run: `langpwt train --preset tiny` or `python -m flows.train --preset tiny --max-steps 60`."""
from __future__ import annotations

import sys
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, Field

from tasks.train import plan_task, report_task, train_task


class TrainParams(BaseModel):
    """The flow's parameters; anything in `overrides` maps to a trainer flag (e.g. {"lr": 3e-4})."""
    preset: str = Field("seed", description="seed | tiny")
    home: str | None = Field(None, description="state folder; default $LANGPWT_HOME or ./.langpwt")
    run_id: str | None = None
    resume: bool = Field(False, description="continue the newest run (or run_id) up to max_steps")
    max_steps: int | None = Field(None, ge=1)
    seed: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = True
    nproc: int | None = Field(None, ge=1, description="processes (GPUs); default: every visible GPU")
    overrides: dict[str, Any] = Field(default_factory=dict)

    def trainer_overrides(self) -> dict:
        base = {"max_steps": self.max_steps, "seed": self.seed, "device": self.device,
                "compile": None if self.compile else False}
        return {k: v for k, v in {**base, **self.overrides}.items() if v is not None}


class TrainingFailed(RuntimeError):
    pass


@flow(name="train", log_prints=True)
def train(params: TrainParams) -> dict:
    plan = plan_task(params.home, params.preset, params.trainer_overrides(), params.resume, params.run_id,
                     params.nproc)
    result = train_task(plan)
    result["report"] = report_task(plan)
    if result["exit_code"]:
        raise TrainingFailed(f"run {plan.run_id}: {result['error']}")
    return result


if __name__ == "__main__":
    import argparse

    from model.args import add_config_args, overrides

    p = argparse.ArgumentParser(prog="python -m flows.train")
    p.add_argument("--home")
    p.add_argument("--run-id")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--nproc", type=int)
    add_config_args(p)
    a = p.parse_args()
    ov = overrides(a)
    out = train(TrainParams(preset=a.preset or "seed", home=a.home, run_id=a.run_id, resume=a.resume,
                            nproc=a.nproc, overrides=ov))
    print(out)
    sys.exit(0)
