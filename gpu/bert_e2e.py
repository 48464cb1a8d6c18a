"""GPU proof kit, step "bert": a small BertModel built from a config with a fixed seed, run through
Indexed -> DataLoader(workers, pin_memory) -> Collator (padded and packed) -> device -> Recorder;
every recovered per-token output is compared with the model run on its example alone.
Usage: python gpu/bert_e2e.py DEVICE
"""
import sys

import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel

import provcollate as pc


class _Sentences(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, 100, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g)
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def run(device: torch.device) -> None:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    model = BertModel(config).to(device).eval()
    data = _Sentences(40)
    for packed in (False, True):
        loader = DataLoader(pc.Indexed(data), batch_size=8, num_workers=2, pin_memory=device.type == "cuda",
                            collate_fn=pc.Collator(packed=packed))
        rec = pc.Recorder(num_items=len(data), device=device)
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(device, non_blocking=True)
                padded = batch.padded() if packed else batch
                hidden = model(input_ids=padded["input_ids"], attention_mask=padded.mask).last_hidden_state
                rec.add(padded, hidden, per_token=True)
            preds = rec.result()
            for i, ids in enumerate(data.items):
                alone = model(input_ids=ids[None].to(device)).last_hidden_state[0]
                torch.testing.assert_close(preds[i].to(device), alone, atol=1e-4, rtol=1e-4)
    print(f"bert: {len(data)} examples, padded and packed, match the model run alone on {device}")


if __name__ == "__main__":
    run(torch.device(sys.argv[1]))
