"""Flow `pipeline`: prepare (download or local source → shards), train, then evaluate, as subflows of one run.
Run: `python -m flows.pipeline --home .langpwt/demo` (the bundled sample + `tiny`, what `pipeline/demo` does),
or as a deployment: `prefect deployment run 'pipeline/demo' --watch` (README "Run it for real").
Trade-off: the flow takes top-level parameters (`home`, `prepare`, `train`, `evaluate`) rather than one model,
because Prefect merges `--param` overrides key by key at the top level only: `--param home=/x` keeps the
deployment's `prepare`/`train` settings, while `--param train='{...}'` replaces the whole training block."""
from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.evaluate import EvaluateParams
from flows.evaluate import evaluate as evaluate_flow
from flows.prepare import PrepareParams
from flows.prepare import prepare as prepare_flow
from flows.train import TrainParams
from flows.train import train as train_flow
from storage.paths import Home

DEMO_PREPARE = dict(source="data/sample", vocab_size=8192)  # the sample's 4M characters can't fill 48,951
DEMO_TRAIN = dict(preset="tiny", device="cpu")
DEMO_EVALUATE = dict(tasks=["bpb"], device="cpu")  # HellaSwag's data is not bundled: offline, bpb alone


class PipelineFailed(RuntimeError):
    pass


def _table(summary: dict) -> str:
    keys = ("built", "skipped", "tokens", "kept", "docs_in", "seconds")
    return "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| " + \
        " | ".join(f"{summary.get(k, '')}" for k in keys) + " |\n"


@flow(name="pipeline", log_prints=True)
def pipeline(home: str | None = None, prepare: PrepareParams | None = None, train: TrainParams | None = None,
             evaluate: EvaluateParams | None = None) -> dict:
    """Prepare the data, train on it, evaluate the run; one flow run id covers the subflows and all their tasks.

    `home` (default: each block's own, else $LANGPWT_HOME or ./.langpwt) wins over the blocks' `home`;
    `evaluate.checkpoint` is always the run just trained."""
    prepare = prepare or PrepareParams(**DEMO_PREPARE)
    train = train or TrainParams(**DEMO_TRAIN)
    evaluate = evaluate or EvaluateParams(**DEMO_EVALUATE)
    # one absolute home for both halves: the trainer's child process runs from the checkout, not our cwd
    root = str(Home.from_env(home or prepare.home or train.home).root)
    log = get_run_logger()
    log.info(f"pipeline {flow_run.id}: home {root}")
    data = prepare_flow(prepare.model_copy(update={"home": root}))
    if data["failed"]:
        # training on a partial dataset would silently differ from what was asked for
        raise PipelineFailed(f"prepare: {len(data['failed'])} source file(s) failed ("
                             + "; ".join(f"{f}: {r}" for f, r in data["failed"].items())
                             + "); fix or remove them and rerun: finished shards are skipped")
    result = train_flow(train.model_copy(update={"home": root}))
    evals = evaluate_flow(evaluate.model_copy(update={"home": root, "checkpoint": result["run_id"]}))
    scores = "\n".join(f"| {r['task']} | {m['metric']} | {m['value']:.4f} | {m['n']:,} |"
                       for r in evals["results"] for m in r["metrics"])
    create_markdown_artifact(
        key="pipeline-summary", description=f"pipeline run {flow_run.id}",
        markdown=(f"### Pipeline `{flow_run.id}`\n\nHome: `{root}`\n\n#### Data\n\n{_table(data)}\n"
                  f"#### Training\n\nRun `{result['run_id']}`, checkpoint `{result['checkpoint']}`, "
                  f"report `{result.get('report')}`, Hugging Face folder `{result.get('hf')}`\n\n"
                  f"#### Evaluation of `{evals['checkpoint']}`\n\n| task | metric | value | n |\n|---|---|---|---|\n"
                  f"{scores}\n"))
    return dict(home=root, prepare={k: v for k, v in data.items() if k != "table"}, train=result,
                evaluate=[{k: v for k, v in r.items() if k != "metrics"} | {"metrics": r["metrics"]}
                          for r in evals["results"]])


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description="the pipeline/demo deployment, locally")
    p.add_argument("--home", default=".langpwt/demo")
    p.add_argument("--prepare", type=json.loads, default=DEMO_PREPARE, help="PrepareParams as JSON")
    p.add_argument("--train", type=json.loads, default=DEMO_TRAIN, help="TrainParams as JSON")
    p.add_argument("--evaluate", type=json.loads, default=DEMO_EVALUATE, help="EvaluateParams as JSON")
    a = p.parse_args()
    out = pipeline(a.home, PrepareParams(**a.prepare), TrainParams(**a.train), EvaluateParams(**a.evaluate))
    print(json.dumps(out, indent=1, default=str))
    sys.exit(0)
