"""Time HellaSwag scoring per 1,000 items on HellaSwag-shaped items cut from the bundled sample's real text.
A checkpoint (with its home's tokenizer) or random weights of a preset; random weights time the same work, not
the same accuracy. Prints one JSON object. Run from the checkout:
  python benchmarks/eval_bench.py --preset seed --device cpu --items 200
  python benchmarks/eval_bench.py --checkpoint latest --home ~/.langpwt --device cuda --items 2000
  python benchmarks/eval_bench.py --items-file items.jsonl --tokenizer HOME/tokenizer/tokenizer.json --device cuda
(the last needs neither pyarrow nor polars: a GPU machine with torch and tokenizers alone)"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.evaluate import load_for_eval  # noqa: E402
from model.generate import EOT, Loaded, pick_device  # noqa: E402
from model.hellaswag import score  # noqa: E402
from tasks.hellaswag import read_items  # noqa: E402


def random_model(preset_name: str, tokenizer: Path, device: str, given: Path | None = None) -> Loaded:
    """Random weights of a preset at the tokenizer's vocabulary: `given`, or one trained on the sample at the full
    48,951 ids (it runs out of merges earlier, so items come out a little longer in tokens than with a real one)."""
    from model.config import preset
    from model.gpt import GPT
    from model.runtime import load_tokenizer

    if given is None:
        from tasks.tokenizer import TokenizerConfig, train_tokenizer
        from tests.hellaswag_fixture import sample_texts

        train_tokenizer(iter(sample_texts()), tokenizer, TokenizerConfig())
    tok, sha, vocab = load_tokenizer(given or tokenizer)
    torch.manual_seed(0)
    model = GPT(preset(preset_name, vocab).model).to(device).eval()
    return Loaded(model, tok, tok.token_to_id(EOT), {"tokenizer_sha256": sha}, device, tokenizer, Path("random"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="eval_bench", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="latest | run id | step folder (default: random weights of --preset)")
    p.add_argument("--home", help="state folder of --checkpoint (default $LANGPWT_HOME or ./.langpwt)")
    p.add_argument("--preset", default="seed", help="model shape for random weights: seed | tiny (default: seed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--items", type=int, default=200, help="items to score (default: 200)")
    p.add_argument("--batch-items", type=int, default=8, help="items per forward, 4 endings each (default: 8)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--items-file", type=Path, help="HellaSwag .jsonl to score (default: items cut from the sample)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json for random weights (default: one trained here)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    device = pick_device(a.device)
    if a.checkpoint:
        from storage.checkpoints import resolve
        from storage.paths import Home

        home = Home.from_env(a.home)
        loaded = load_for_eval(resolve(a.checkpoint, home), home.tokenizer, device)
    else:
        loaded = random_model(a.preset, work / "tokenizer.json", device, a.tokenizer)
    if a.items_file is None:
        from tests.hellaswag_fixture import make_rows, sample_texts, write_jsonl

        a.items_file = write_jsonl(work / "items.jsonl", make_rows(sample_texts(), a.items, seed=0))
    items = read_items(a.items_file)[: a.items]
    score(loaded.model, loaded.tokenizer, items[: max(1, a.batch_items)], a.batch_items)  # warm-up: allocator, kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = score(loaded.model, loaded.tokenizer, items, a.batch_items)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cfg = loaded.model.config
    out = {"model": str(loaded.step_dir) if a.checkpoint else f"random {a.preset}", "device": device,
           "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "threads": torch.get_num_threads(), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
           "block_size": cfg.block_size, "vocab_size": cfg.vocab_size, "items": r["n"], "batch_items": a.batch_items,
           "seconds": round(seconds, 3), "seconds_per_1000_items": round(seconds / r["n"] * 1000, 2),
           "acc": r["acc"], "acc_norm": r["acc_norm"]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
