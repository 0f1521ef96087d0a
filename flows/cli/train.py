"""CLI for training and generation: `langpwt train` runs the Prefect flow, `langpwt generate` streams text.
Training flags are generated from the trainer's config, so the CLI and `python -m model.train` agree."""
from __future__ import annotations

import argparse
import sys


def cmd_train(args: argparse.Namespace) -> int:
    from flows.train import TrainingFailed, TrainParams, train
    from model.args import overrides
    from storage.paths import Home
    from tasks.train import check_inputs

    ov = overrides(args)
    try:
        # bad input answered in one line before Prefect starts (its task tracebacks are many lines)
        check_inputs(Home.from_env(args.home), args.resume, args.run_id)
        params = TrainParams(preset=args.preset or "seed", home=args.home, run_id=args.run_id, resume=args.resume,
                             nproc=args.nproc, overrides=ov)
        out = train(params)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run {out['run_id']}: done; checkpoint {out['checkpoint']}; report {out['report']}")
    return 0


def generate(home, checkpoint: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
             device: str = "auto", tokenizer=None, out=None) -> str:
    """Stream a continuation of `prompt` to `out` (stdout) as tokens come; returns the text."""
    import torch

    from model.generate import TextStream, load_model, sample
    from model.runtime import load_tokenizer
    from storage.checkpoints import resolve

    step_dir = resolve(checkpoint, home)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    model, cfg = load_model(step_dir, dev)
    tok_path = tokenizer or home.tokenizer
    tok, sha, vocab = load_tokenizer(tok_path)
    if vocab != model.config.vocab_size:
        raise ValueError(f"{tok_path}: vocab size {vocab} differs from {model.config.vocab_size} of checkpoint {step_dir}")
    if cfg.get("tokenizer_sha256") != sha:
        raise ValueError(f"{tok_path}: sha256 {sha[:12]} differs from the tokenizer checkpoint {step_dir} "
                         f"was trained with ({str(cfg.get('tokenizer_sha256'))[:12]})")
    out = out or sys.stdout
    stream = TextStream(tok)
    eot = tok.token_to_id("<|endoftext|>")
    ids = tok.encode(prompt).ids if prompt else [eot]
    out.write(prompt)
    out.flush()
    for t in sample(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_id=eot):
        if t == eot:
            break
        out.write(stream.push(t))
        out.flush()
    out.write(stream.flush() + "\n")
    return prompt + stream.emitted


def cmd_generate(args: argparse.Namespace) -> int:
    from storage.paths import Home

    try:
        generate(Home.from_env(args.home), args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                 args.top_k or None, args.top_p, args.seed, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub) -> None:
    from model.args import add_config_args

    p = sub.add_parser("train", help="train the GPT on the shards (Prefect flow `train`)")
    p.add_argument("--run-id", help="run folder name (default: preset-timestamp)")
    p.add_argument("--resume", action="store_true", help="continue the newest run (or --run-id) to --max-steps")
    p.add_argument("--nproc", type=int, help="processes/GPUs (default: every visible GPU)")
    add_config_args(p)
    p.set_defaults(handler=cmd_train)
    g = sub.add_parser("generate", help="sample text from a checkpoint, streamed")
    g.add_argument("--checkpoint", default="latest", help="latest | run id | run or step folder")
    g.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50, help="0 disables")
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.set_defaults(handler=cmd_generate)
