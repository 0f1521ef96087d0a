"""Generation from a trained checkpoint: streamed, seeded, tokenizer checked.
The checkpoint comes from a short real training run, not saved random weights."""
from __future__ import annotations

import io
import json

import pytest

from flows.cli.train import generate
from tests.train_fixtures import FAST, run_trainer, train_home  # noqa: F401


class Chunks(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += bool(s)
        return super().write(s)


def test_generate_streams_from_latest_checkpoint(train_home):
    assert run_trainer(train_home, *FAST, "--max-steps", "20", "--run-id", "g")[0] == 0
    out = Chunks()
    text = generate(train_home, "latest", "The function", max_new_tokens=30, seed=5, out=out)
    assert text.startswith("The function") and len(text) > len("The function") + 10
    assert out.writes > 10 and out.getvalue().rstrip("\n") == text  # piece by piece, as sampled
    assert generate(train_home, "g", "The function", max_new_tokens=30, seed=5, out=io.StringIO()) == text
    assert generate(train_home, "latest", "The function", max_new_tokens=30, seed=6, out=io.StringIO()) != text
    tok = json.loads(train_home.tokenizer.read_text())
    train_home.tokenizer.write_text(json.dumps(tok, indent=2))
    with pytest.raises(ValueError, match="differs from the tokenizer checkpoint"):
        generate(train_home, "latest", "x", max_new_tokens=2, out=io.StringIO())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        generate(train_home, "nope", "x", out=io.StringIO())


def test_sampling_settings_are_checked_and_temperature_zero_is_greedy(train_home, tmp_path):
    """--top-k -2, --top-p 5, --max-new-tokens -3: one line and exit 2 (checked before any checkpoint is read);
    temperature 0 takes the likeliest token, so the text does not depend on the seed."""
    from tests.conftest import run_cli

    for flags, where in ((["--top-k", "-2"], "--top-k -2"), (["--top-p", "5"], "--top-p 5.0"),
                         (["--max-new-tokens", "-3"], "--max-new-tokens -3"), (["--temperature", "nan"], "--temperature")):
        p = run_cli("--home", str(tmp_path / "none"), "generate", *flags)
        assert p.returncode == 2 and p.stderr.startswith(f"langpwt: error: {where}"), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert run_trainer(train_home, *FAST, "--max-steps", "10", "--run-id", "greedy")[0] == 0
    a = generate(train_home, "greedy", "The", max_new_tokens=20, temperature=0, seed=1, out=io.StringIO())
    b = generate(train_home, "greedy", "The", max_new_tokens=20, temperature=0, seed=2, out=io.StringIO())
    assert a == b and len(a) > len("The")


def test_checkpoints_keep_their_tokenizer_after_a_retrain(train_home):
    """A run keeps a copy of its tokenizer (written when the flow plans it): its checkpoints still load after the
    home's tokenizer changes; a run without a copy is refused in one line naming both sha256s."""
    import shutil

    from dashboards import generation
    from storage.shards import file_sha256
    from tasks.train import keep_tokenizer

    assert run_trainer(train_home, *FAST, "--max-steps", "10", "--run-id", "old")[0] == 0
    shutil.copytree(train_home.run_dir("old"), train_home.run_dir("kept"))
    keep_tokenizer(train_home, "kept", None)
    copy = train_home.run_dir("kept") / "tokenizer.json"
    assert copy.read_bytes() == train_home.tokenizer.read_bytes()
    before = generate(train_home, "kept", "The", max_new_tokens=12, seed=3, out=io.StringIO())
    old_sha = file_sha256(train_home.tokenizer)
    tok = json.loads(train_home.tokenizer.read_text())
    train_home.tokenizer.write_text(json.dumps(tok, indent=2))  # the home's tokenizer retrained
    assert generate(train_home, "kept", "The", max_new_tokens=12, seed=3, out=io.StringIO()) == before
    step = train_home.run_dir("kept") / "checkpoints" / "step_000010"
    assert generation.load(step, train_home.tokenizer, "cpu").tokenizer_path == copy
    with pytest.raises(ValueError) as e:
        generate(train_home, "old", "The", max_new_tokens=2, out=io.StringIO())
    msg = str(e.value)
    assert "\n" not in msg and old_sha[:12] in msg and file_sha256(train_home.tokenizer)[:12] in msg
    # a resume of the old run does not copy the home's new tokenizer in as if it were the run's
    keep_tokenizer(train_home, "old", ckpts_latest(train_home, "old"))
    assert not (train_home.run_dir("old") / "tokenizer.json").exists()


def ckpts_latest(home, run_id):
    from storage import checkpoints as ckpts

    return ckpts.latest(ckpts.checkpoint_root(home, run_id))
