"""transformers: ``Trainer(data_collator=pc.Collator(...))`` and ``provcollate.integrations.transformers.predict``.

    python examples/transformers_predict.py                              # one process
    torchrun --nproc-per-node 2 examples/transformers_predict.py         # 2 processes (gloo on the CPU)

A tiny BERT token tagger built from a config (random weights, nothing downloaded) is trained
for a few steps by ``trainer.train()`` on an ``Indexed`` dataset of tokenized dicts, then
``predict`` runs it over the dataset in length buckets (2 DataLoader workers) and returns
per-token logits in dataset order, unpadded; every item is checked against the model run on it alone.
"""
from __future__ import annotations

import tempfile

import torch
import transformers

import provcollate as pc
from provcollate.integrations.transformers import predict

VOCAB, TAGS = 40, 3


def make_dataset(n: int = 37) -> list:
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [t % TAGS for t in ids]})
    return items


def main() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, num_labels=TAGS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForTokenClassification(config)
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(prefix="provcollate-"), report_to=[], use_cpu=not torch.cuda.is_available(),
                                          per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
                                          learning_rate=1e-2, dataloader_num_workers=2)
    collator = pc.Collator(pad_values={"attention_mask": 0, "labels": -100})
    dataset = make_dataset()
    trainer = transformers.Trainer(model=model, args=args, data_collator=collator, train_dataset=pc.Indexed(dataset))
    trainer.train()

    preds = predict(trainer, dataset, per_token=True, lengths=pc.lengths_of(dataset, "input_ids"))

    assert preds.index.tolist() == list(range(len(dataset))), "every item exactly once"
    model = trainer.model.eval()
    with torch.no_grad():
        for i, item in enumerate(dataset):
            alone = model(input_ids=torch.tensor([item["input_ids"]], device=args.device)).logits[0]
            torch.testing.assert_close(preds[i].to(alone.device), alone, rtol=1e-4, atol=1e-5)
    if trainer.is_world_process_zero():
        print(f"transformers ({trainer.accelerator.num_processes} process(es)): trained, {len(dataset)} items predicted, every prediction checked")


if __name__ == "__main__":
    main()
