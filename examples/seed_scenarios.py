"""The seed article's three scenarios, done by hand (as the article does) and with provcollate.

1. fixed-size inputs, 2. augmented inputs, 3. padded sequences. Each runs a shuffled DataLoader
with 2 workers, recovers every prediction in dataset order, checks it against the model run on
that example alone, and prints the time of both pipelines on the same data.

    python examples/seed_scenarios.py [--items N]
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

import provcollate as pc


# --- the article's datasets (scenario 2's transform draws from torch and `random`) -----------------

class SyntheticDataset(Dataset):
    def __init__(self, size):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randn(size, 10, generator=g)
        self.labels = torch.randint(0, 2, (size,), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx], self.labels[idx], idx


class AugmentedDataset(SyntheticDataset):
    """The article's augmented dataset, without the index: provcollate.Indexed attaches it."""

    def __getitem__(self, idx):
        x = self.data[idx] + torch.randn(10) * 0.1
        x = x * (1 + random.uniform(-0.05, 0.05))
        return x, self.labels[idx]


class SequenceDataset(Dataset):
    def __init__(self, num_sequences, max_length=20):
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(1, max_length + 1, (num_sequences,), generator=g).tolist()
        self.data = [torch.randint(0, 100, (n,), generator=g) for n in lengths]
        self.labels = torch.randint(0, 2, (num_sequences,), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx], self.labels[idx], idx


# --- the article's hand-written collate functions and reconstruction loops ------------------------

def seed_collate(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]), torch.tensor([b[2] for b in batch])


def seed_sequence_collate(batch):
    inputs = [b[0] for b in batch]
    return (pad_sequence(inputs, batch_first=True), torch.tensor([b[1] for b in batch]),
            torch.tensor([b[2] for b in batch]), torch.tensor([len(s) for s in inputs]))


def loader(dataset, collate_fn, workers):
    return DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(1), persistent_workers=False)


def scenario_fixed(n, workers):
    ds = SyntheticDataset(n)
    model = torch.nn.Linear(10, 2).eval()
    expected = model(ds.data).argmax(1)

    t0 = time.perf_counter()
    idx_all, pred_all = [], []
    with torch.no_grad():
        for x, _y, idx in loader(ds, seed_collate, workers):
            pred_all.append(model(x).argmax(1))
            idx_all.append(idx)
    idx_all, pred_all = torch.cat(idx_all), torch.cat(pred_all)
    by_hand = {}
    for i in range(len(idx_all)):
        by_hand[idx_all[i].item()] = pred_all[i].item()
    t_hand = time.perf_counter() - t0
    assert all(by_hand[i] == expected[i].item() for i in range(n))

    t0 = time.perf_counter()
    rec = pc.Recorder(num_items=n, reduce="argmax")
    with torch.no_grad():
        for batch in loader(ds, pc.Collator(index=2), workers):
            x, _y = batch.data
            rec.add(batch, model(x))
    preds = rec.result()
    t_pc = time.perf_counter() - t0
    assert len(preds.missing(n)) == 0
    assert torch.equal(preds.tensor(), expected), "scenario 1: a prediction landed on the wrong example"
    return t_hand, t_pc, "every argmax equal"


def scenario_augmented(n, workers, views=4):
    base = AugmentedDataset(n)
    ds = pc.Indexed(base, views=views, seed=0)
    model = torch.nn.Linear(10, 2).eval()

    # By hand (the article): keep every augmented input next to its prediction, in memory.
    t0 = time.perf_counter()
    idx_all, pred_all, inputs_all = [], [], []
    with torch.no_grad():
        for batch in loader(ds, lambda b: (torch.stack([s.data[0] for s in b]), torch.tensor([s.index for s in b])), workers):
            x, idx = batch
            pred_all.append(model(x))
            idx_all.append(idx)
            inputs_all.append(x)
    idx_all, pred_all = torch.cat(idx_all), torch.cat(pred_all)
    sums = {}
    for i in range(len(idx_all)):
        k = idx_all[i].item()
        sums[k] = sums.get(k, 0) + pred_all[i]
    t_hand = time.perf_counter() - t0

    # provcollate: views averaged in the Recorder; inputs rebuilt on demand by replay().
    t0 = time.perf_counter()
    rec = pc.Recorder(num_items=n, views="mean")
    with torch.no_grad():
        for batch in loader(ds, pc.Collator(), workers):
            x, _y = batch.data
            rec.add(batch, model(x))
    preds = rec.result()
    t_pc = time.perf_counter() - t0

    worst = 0.0
    for i in random.Random(0).sample(range(n), min(n, 200)):
        with torch.no_grad():
            alone = torch.stack([model(ds.replay(i, v).data[0]) for v in range(views)]).mean(0)
        worst = max(worst, (preds[i] - alone).abs().max().item())
        assert torch.allclose(sums[i] / views, preds[i], atol=1e-5)
    assert worst < 1e-5, worst
    return t_hand, t_pc, f"mean of {views} views, replayed inputs: max |diff| {worst:.1e}"


class TokenModel(torch.nn.Module):
    """Per-token classifier whose output at a position depends only on that example's tokens."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 16)
        self.out = torch.nn.Linear(16, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def scenario_sequences(n, workers):
    ds = SequenceDataset(n)
    model = TokenModel().eval()

    t0 = time.perf_counter()
    idx_all, pred_all, len_all = [], [], []
    with torch.no_grad():
        for padded, _y, idx, lengths in loader(ds, seed_sequence_collate, workers):
            pred_all.append(model(padded).argmax(2))
            idx_all.append(idx)
            len_all.append(lengths)
    by_hand = {}
    for preds_b, idx_b, len_b in zip(pred_all, idx_all, len_all):  # batches differ in T: no torch.cat here
        for i in range(len(idx_b)):
            by_hand[idx_b[i].item()] = preds_b[i][: len_b[i]]
    t_hand = time.perf_counter() - t0

    t0 = time.perf_counter()
    rec = pc.Recorder(num_items=n, reduce="argmax")
    with torch.no_grad():
        for batch in loader(ds, pc.Collator(index=2), workers):
            ids, _y = batch.data
            rec.add(batch, model(ids), per_token=True)
    preds = rec.result()
    t_pc = time.perf_counter() - t0

    with torch.no_grad():
        for i in range(n):
            alone = model(ds.data[i][None])[0].argmax(1)
            assert torch.equal(preds[i], alone), f"scenario 3: item {i} differs from the model run alone"
            assert torch.equal(by_hand[i], alone)
    return t_hand, t_pc, "every token equal, unpadded"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000, help="examples per scenario")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"provcollate {pc.__version__} (compiled core: {pc.HAS_EXTENSION}), torch {torch.__version__}, "
          f"{args.items} examples per scenario, shuffled, {args.workers} workers\n")
    rows = [("1. fixed-size inputs", *scenario_fixed(args.items, args.workers)),
            ("2. augmented inputs (TTA)", *scenario_augmented(args.items, args.workers)),
            ("3. padded sequences", *scenario_sequences(args.items, args.workers))]
    print(f"{'scenario':28} {'by hand (s)':>12} {'provcollate (s)':>16}  check")
    for name, t_hand, t_pc, check in rows:
        print(f"{name:28} {t_hand:12.2f} {t_pc:16.2f}  {check}")
    print("\nall predictions recovered in dataset order and checked against the model run on each example alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
