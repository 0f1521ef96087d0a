"""CLI for `langpwt export` (a checkpoint as a Hugging Face GPT-2 folder) and `langpwt evaluate` (flow `evaluate`).
Bad input is refused in one line before Prefect starts; failures inside the flow are reported in one line too,
while Prefect's own log keeps their tracebacks."""
from __future__ import annotations

import argparse
import json
import sys

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def cmd_export(args: argparse.Namespace) -> int:
    from storage.checkpoints import TokenizerMismatch, resolve
    from storage.hf_export import ExportError, export_hf
    from storage.paths import Home

    home = Home.from_env(args.home)
    try:
        out = export_hf(resolve(args.checkpoint, home), home.tokenizer, args.out, args.force)
    except (ExportError, TokenizerMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported {out['checkpoint']} -> {out['out']} ({out['size_bytes']:,} bytes; "
          f"AutoModelForCausalLM.from_pretrained({out['out']!r}) loads it)")
    return 0


def describe(res: dict) -> str:
    parts = []
    for m in res["metrics"]:
        err = f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else ""
        parts.append(f"{m['metric']} {m['value']:.4f}{err}")
    return f"{res['task']}: " + ", ".join(parts) + f" (n={res['metrics'][0]['n']:,}, {res['seconds']:.1f} s)"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.cli.params import build
    from flows.evaluate import EvaluateParams, check_inputs, evaluate
    from model.evaluate import EvalError
    from storage.hub import HubError
    from tasks.hellaswag import HellaSwagError

    try:
        params = build(EvaluateParams, args, home=args.home)
        check_inputs(params)  # one line, before Prefect and its task tracebacks
    except (EvalError, HellaSwagError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        out = evaluate(params)
    except (EvalError, HellaSwagError, HubError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(out, indent=1, default=str))
    else:
        print(f"checkpoint {out['checkpoint']}")
        for res in out["results"]:
            print(describe(res))
    return 0


def register(sub) -> None:
    from flows.cli.params import add_model_args
    from tasks.params import EvaluateParams

    e = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 folder (transformers loads it)")
    e.add_argument("--checkpoint", default="latest", help="latest | run id | run folder | step folder (default: latest)")
    e.add_argument("--out", required=True, help="folder to write; must not exist or be empty unless --force")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out (default: off)")
    e.set_defaults(handler=cmd_export)
    v = sub.add_parser("evaluate", help="val bits per byte and HellaSwag of a checkpoint (Prefect flow `evaluate`)")
    add_model_args(v, EvaluateParams, exclude={"home"}, parsers={"device": str}, metavars={"tasks": "TASK[,TASK]"})
    v.add_argument("--json", action="store_true", help="print the results as JSON (default: off)")
    v.set_defaults(handler=cmd_evaluate)
