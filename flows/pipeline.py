"""Flow `pipeline`: prepare (download or local source → shards) then train, as subflows of one run.
Run: `python -m flows.pipeline --home .langpwt/demo` (the bundled sample + `tiny`, what `pipeline/demo` does),
or as a deployment: `prefect deployment run 'pipeline/demo' --watch` (README "Run it for real").
Trade-off: the flow takes three top-level parameters (`home`, `prepare`, `train`) rather than one model,
because Prefect merges `--param` overrides key by key at the top level only: `--param home=/x` keeps the
deployment's `prepare`/`train` settings, while `--param train='{...}'` replaces the whole training block."""
from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.prepare import PrepareParams
from flows.prepare import prepare as prepare_flow
from flows.train import TrainParams
from flows.train import train as train_flow
from storage.paths import Home

DEMO_PREPARE = dict(source="data/sample", vocab_size=8192)  # the sample's 4M characters can't fill 48,951
DEMO_TRAIN = dict(preset="tiny", device="cpu")


class PipelineFailed(RuntimeError):
    pass


def _table(summary: dict) -> str:
    keys = ("built", "skipped", "tokens", "kept", "docs_in", "seconds")
    return "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| " + \
        " | ".join(f"{summary.get(k, '')}" for k in keys) + " |\n"


@flow(name="pipeline", log_prints=True)
def pipeline(home: str | None = None, prepare: PrepareParams | None = None, train: TrainParams | None = None) -> dict:
    """Prepare the data, then train on it; one flow run id covers both subflows and all their tasks.

    `home` (default: each block's own, else $LANGPWT_HOME or ./.langpwt) wins over the blocks' `home`."""
    prepare = prepare or PrepareParams(**DEMO_PREPARE)
    train = train or TrainParams(**DEMO_TRAIN)
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
    create_markdown_artifact(
        key="pipeline-summary", description=f"pipeline run {flow_run.id}",
        markdown=(f"### Pipeline `{flow_run.id}`\n\nHome: `{root}`\n\n#### Data\n\n{_table(data)}\n"
                  f"#### Training\n\nRun `{result['run_id']}`, checkpoint `{result['checkpoint']}`, "
                  f"report `{result.get('report')}`\n"))
    return dict(home=root, prepare={k: v for k, v in data.items() if k != "table"}, train=result)


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description="the pipeline/demo deployment, locally")
    p.add_argument("--home", default=".langpwt/demo")
    p.add_argument("--prepare", type=json.loads, default=DEMO_PREPARE, help="PrepareParams as JSON")
    p.add_argument("--train", type=json.loads, default=DEMO_TRAIN, help="TrainParams as JSON")
    a = p.parse_args()
    out = pipeline(a.home, PrepareParams(**a.prepare), TrainParams(**a.train))
    print(json.dumps(out, indent=1, default=str))
    sys.exit(0)
