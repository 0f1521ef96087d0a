"""fastokens must give exactly the ids of `tokenizers` for our tokenizer.json, and decoding is byte-exact."""
import numpy as np
import pytest

from tasks.tokenizer import EOT, Encoder, TokenizerConfig, train_tokenizer
from tests.conftest import sample_rows

ODD = ["", "a", "héllo wörld — naïve café", "日本語のテキストと中文文本", "emoji 🎉👍🏽 👨‍👩‍👧 🇫🇷",
       "x" * 100_000, "word " * 20_000, "ctrl \x00\x01\x7f\t\r\n end", "literal <|endoftext|> inside",
       "<|endoftext|>", "  leading and trailing spaces  ", "\n\n\n", "ǅ ﬁ ℌ Ⅻ ⁂ ∑∫", "é" * 50_000]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [r["text"] for r in sample_rows()]
    train_tokenizer(iter(texts), out, TokenizerConfig(vocab_size=4096))
    return out


def test_fastokens_ids_identical_to_tokenizers(tokenizer_path):
    enc = Encoder(tokenizer_path)
    assert enc.backend == "fastokens"
    ref = Encoder(tokenizer_path, backend="tokenizers")
    texts = [r["text"] for r in sample_rows()] + ODD
    ids, offs = enc.encode_flat(texts)
    rids, roffs = ref.encode_flat(texts)
    assert np.array_equal(offs, roffs)
    assert np.array_equal(ids, rids)
    # and per document, against tokenizers' own single-text encode
    for i, t in enumerate(ODD):
        k = len(texts) - len(ODD) + i
        assert ids[offs[k]:offs[k + 1]].tolist() == ref.ref.encode(t, add_special_tokens=False).ids


def test_decode_is_byte_exact(tokenizer_path):
    enc = Encoder(tokenizer_path)
    texts = [r["text"] for r in sample_rows()[:300]] + ODD
    ids, offs = enc.encode_flat(texts)
    for k, t in enumerate(texts):
        assert enc.decode(ids[offs[k]:offs[k + 1]]) == t


def test_eot_in_text_is_not_the_separator(tokenizer_path):
    enc = Encoder(tokenizer_path)
    ids, _ = enc.encode_flat(["a <|endoftext|> b"])
    assert enc.eot not in ids.tolist()
    assert enc.ref.token_to_id(EOT) == enc.eot


def test_training_is_deterministic_and_bounded(tmp_path):
    texts = [r["text"] for r in sample_rows()]
    a = train_tokenizer(iter(texts), tmp_path / "a.json", TokenizerConfig(vocab_size=2048, max_token_length=16))
    b = train_tokenizer(iter(texts), tmp_path / "b.json", TokenizerConfig(vocab_size=2048, max_token_length=16))
    assert a == b
    import json
    vocab = json.loads((tmp_path / "a.json").read_text())["model"]["vocab"]
    assert len(vocab) == 2048 and max(len(t) for t in vocab) <= 16


@pytest.mark.parametrize("backend", ["fastokens", "tokenizers"])
def test_encode_docs_is_eot_then_each_document(tokenizer_path, backend, monkeypatch):
    """The shard path (EOT added by fastokens' template, in slices of a few MB) gives exactly EOT +
    encode_flat per document, in order, whatever the slicing."""
    import tasks.tokenizer as tk

    monkeypatch.setattr(tk._slices, "__defaults__", (30_000,))  # many slices, some holding one long document
    enc = Encoder(tokenizer_path, backend=backend)
    texts = [r["text"] for r in sample_rows()[:400]] + ODD
    ids, offs = enc.encode_flat(texts)
    want = np.concatenate([np.concatenate([[enc.eot], ids[offs[k]:offs[k + 1]]]) for k in range(len(texts))])
    parts = list(enc.encode_docs(texts, np.uint16))
    assert len(parts) > 10 and all(t.dtype == np.uint16 for t, _ in parts)
    got = np.concatenate([t for t, _ in parts])
    starts = np.concatenate([s + sum(p.size for p, _ in parts[:i]) for i, (_, s) in enumerate(parts)])
    assert np.array_equal(got, want)
    assert np.array_equal(starts, offs[:-1].astype(np.int64) + np.arange(len(texts)))
    assert np.array_equal(enc.encode_flat(texts)[0], Encoder(tokenizer_path, backend="tokenizers").encode_flat(texts)[0])


@pytest.mark.parametrize("layout", ["as_written", "pretty", "model_first"])
def test_eot_template_loads_from_any_layout_of_the_file(tokenizer_path, tmp_path, layout):
    """The loader edits the post-processor without parsing the model where the file allows it; every
    layout of the same JSON must give the same ids (with the EOT template) as the file tokenizers wrote."""
    import json

    from tasks.tokenizer import _split_model

    spec = json.loads(tokenizer_path.read_text())
    if layout == "as_written":
        path = tokenizer_path
    else:
        if layout == "model_first":
            spec = {"model": spec.pop("model"), **spec}
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(spec, indent=2 if layout == "pretty" else None, ensure_ascii=False))
    head, model = _split_model(path.read_text())
    assert (model is None) == (layout == "model_first")
    if model is not None:  # the split is exact: head and model make the file's object again
        assert json.loads(head[:-1] + ',"model":' + model) == spec
    texts = [r["text"] for r in sample_rows()[:200]] + ODD
    want = list(Encoder(tokenizer_path).encode_docs(texts, np.uint32))
    got = list(Encoder(path).encode_docs(texts, np.uint32))
    assert len(got) == len(want) and all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                                         for a, b in zip(got, want))
