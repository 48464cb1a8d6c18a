"""accelerate: prepare + Recorder + gather, with even_batches' padding repeats handled.

    torchrun --nproc-per-node 2 examples/accelerate_predict.py     # or: accelerate launch --num_processes 2 --cpu ...
    python examples/accelerate_predict.py                         # one process

``accelerator.prepare(loader)`` shards a shuffled DataLoader (2 workers) over the processes and
moves every :class:`provcollate.Batch` with ``batch.to()``, identity intact. With
``even_batches=True`` (accelerate's default) the last batches are topped up with items from the
start of the dataset, so some items run twice: ``Recorder(on_duplicate="first")`` keeps one of
each, and ``Recorder.gather`` returns every item exactly once, in dataset order, on every
process. ``gather_for_metrics`` (which drops the same repeats) is checked to agree, and every
prediction against the model run on its item alone.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

import provcollate as pc

VOCAB, CLASSES = 50, 3


class Classifier(nn.Module):
    """A masked mean of token embeddings, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.out = nn.Linear(16, CLASSES)

    def forward(self, input_ids, mask):
        h = self.embed(input_ids) * mask[..., None]
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


def make_dataset(n: int = 41) -> list:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)} for _ in range(n)]


def main() -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dataset = make_dataset()
    loader = DataLoader(pc.Indexed(dataset), batch_size=4, shuffle=True, num_workers=2, collate_fn=pc.Collator())
    model, loader = accelerator.prepare(Classifier().eval(), loader)
    recorder = pc.Recorder(num_items=len(dataset), on_duplicate="first")  # even_batches repeats some items
    seen, rows = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["input_ids"], batch.mask)
            recorder.add(batch, logits)
            index, gathered = accelerator.gather_for_metrics((batch.index, logits))
            seen.append(index.cpu())
            rows.append(gathered.cpu())
    preds = recorder.gather()

    assert preds.index.tolist() == list(range(len(dataset))), "every item exactly once"
    seen, rows = torch.cat(seen), torch.cat(rows)
    assert sorted(seen.tolist()) == list(range(len(dataset))), "gather_for_metrics drops the same repeats"
    for i, row in zip(seen.tolist(), rows):
        torch.testing.assert_close(preds[i], row)
    reference = Classifier().eval()
    with torch.no_grad():
        for i, item in enumerate(dataset):
            ids = item["input_ids"][None]
            torch.testing.assert_close(preds[i], reference(ids, torch.ones_like(ids, dtype=torch.bool))[0])
    if accelerator.is_main_process:
        print(f"accelerate ({accelerator.num_processes} process(es)): {len(dataset)} items, every prediction checked, gather_for_metrics agrees")


if __name__ == "__main__":
    main()
