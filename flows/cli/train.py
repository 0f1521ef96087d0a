"""CLI for training and generation: `langpwt train` runs the Prefect flow, `langpwt generate` streams text.
Training flags are generated from the trainer's config, so the CLI and `python -m model.train` agree."""
from __future__ import annotations

import argparse
import sys


def err(msg: str) -> int:
    print(f"langpwt: error: {msg.splitlines()[0] if msg else msg}", file=sys.stderr)
    return 2


def check_train(args: argparse.Namespace) -> dict:
    """The trainer overrides of `args`, checked before Prefect or torch is imported: values (preset, then
    the inputs, the checkpoint to resume, memory) are refused in one line, before any run folder or row."""
    from model.args import overrides
    from model.config import preset

    ov = overrides(args)
    preset(args.preset or "seed").override(ov)  # the values alone: a bad one costs no import of torch
    from storage.paths import Home
    from tasks.train import check_inputs, check_memory, cuda_visible, planned_config

    home = Home.from_env(args.home)
    _, last = check_inputs(home, args.resume, args.run_id)
    cfg = planned_config(home, args.preset or "seed", ov, last)
    check_memory(cfg, cuda_visible(cfg.device))
    return ov


def cmd_train(args: argparse.Namespace) -> int:
    try:
        ov = check_train(args)
    except (FileNotFoundError, ValueError) as e:
        return err(str(e))
    from flows.train import TrainingFailed, TrainParams, train

    try:
        out = train(TrainParams(preset=args.preset or "seed", home=args.home, run_id=args.run_id,
                                resume=args.resume, nproc=args.nproc, **ov))
    except TrainingFailed as e:
        print(f"langpwt: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        return err(str(e))
    print(f"run {out['run_id']}: done; checkpoint {out['checkpoint']}; report {out['report']}")
    return 0


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One line naming the flag when a sampling setting means nothing."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not temperature >= 0 or temperature == float("inf"):  # nan fails both comparisons
        raise ValueError(f"--temperature {temperature}: must be a number >= 0 (0: always the likeliest token)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k {top_k}: must be >= 0 (0: no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p {top_p}: must lie in (0, 1]")


def generate(home, checkpoint: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
             device: str = "auto", out=None) -> str:
    """Stream a continuation of `prompt` to `out` (stdout) as tokens come; returns the text.
    Temperature 0 takes the likeliest token at every step: the same text on every call, whatever the seed."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    from model.generate import TextStream, load_trained, sample
    from storage.checkpoints import resolve

    m = load_trained(resolve(checkpoint, home), home.tokenizer, device)
    out = out or sys.stdout
    stream = TextStream(m.tokenizer)
    ids = m.tokenizer.encode(prompt).ids if prompt else [m.eot]
    out.write(prompt)
    out.flush()
    for t in sample(m.model, ids, max_new_tokens, temperature, top_k or None, top_p, seed, stop_id=m.eot):
        if t == m.eot:
            break
        out.write(stream.push(t))
        out.flush()
    out.write(stream.flush() + "\n")
    return prompt + stream.emitted


def cmd_generate(args: argparse.Namespace) -> int:
    from storage.paths import Home

    try:
        generate(Home.from_env(args.home), args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                 args.top_k, args.top_p, args.seed, args.device)
    except (FileNotFoundError, ValueError) as e:
        return err(str(e))
    return 0


def register(sub) -> None:
    from model.args import add_config_args

    # conflict_handler: the --device below replaces the generated one, to show its choices
    p = sub.add_parser("train", help="train the GPT on the shards (Prefect flow `train`)", conflict_handler="resolve")
    p.add_argument("--run-id", help="run folder name (default: preset-timestamp)")
    p.add_argument("--resume", action="store_true", help="continue the newest run (or --run-id) to --max-steps")
    p.add_argument("--nproc", type=int, help="processes/GPUs (default: every visible GPU)")
    add_config_args(p)
    # not argparse's choices: its refusal prints the whole usage; TrainConfig.validate refuses in one line
    p.add_argument("--device", metavar="{auto,cpu,cuda}", help="where to train: auto (CUDA if visible), cpu, cuda "
                                                                "(default: the preset's, auto)")
    p.set_defaults(handler=cmd_train)
    g = sub.add_parser("generate", help="sample text from a checkpoint, streamed")
    g.add_argument("--checkpoint", default="latest", help="latest | run id | run or step folder")
    g.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample, at least 1 (default 200)")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature >= 0; 0 always takes the likeliest token (default 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: no limit (default 50)")
    g.add_argument("--top-p", type=float, help="nucleus sampling: the likeliest tokens up to this mass, in (0, 1] "
                                               "(default: off)")
    g.add_argument("--seed", type=int, help="random seed: the same seed gives the same text (default: random)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (default auto: CUDA if visible)")
    g.set_defaults(handler=cmd_generate)
