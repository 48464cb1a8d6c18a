"""GPU proof kit, step "bert": a small BertModel built from a config with a fixed seed (no weights
to bring), run through Indexed -> DataLoader(shuffled, 2 workers, pin_memory) -> Collator (padded,
then packed and padded on the device) -> Recorder; every recovered per-token hidden state and
per-example pooled output is compared with the model run on its example alone.

    python gpu/bert_e2e.py DEVICE
"""
import sys

import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel

import provcollate as pc

BATCH, MAX_LEN = 8, 24


class _Sentences(torch.utils.data.Dataset):
    """Token ids of random lengths in 1..MAX_LEN, made once from a fixed seed."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, 100, (int(torch.randint(1, MAX_LEN + 1, (1,), generator=g)),), generator=g)
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def run(device: torch.device) -> None:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the batched and the lone runs compare in full float32
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    model = BertModel(config).to(device).eval()
    data = _Sentences(64 if device.type == "cuda" else 24)  # a CPU run checks the plumbing only
    with torch.no_grad():
        alone = [model(input_ids=ids[None].to(device)) for ids in data.items]
    for packed in (False, True):
        loader = DataLoader(pc.Indexed(data), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1),
                            num_workers=2, pin_memory=device.type == "cuda", collate_fn=pc.Collator(packed=packed))
        rec = pc.Recorder(num_items=len(data), device=device)
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(device, non_blocking=True)
                padded = batch.padded() if packed else batch
                out = model(input_ids=padded["input_ids"], attention_mask=padded.mask.long())  # as a tokenizer gives it
                rec.add(padded, {"tokens": out.last_hidden_state, "pooled": out.pooler_output}, per_token={"tokens"})
        preds = rec.result()
        assert not len(preds.missing()), f"items never recorded: {preds.missing().tolist()}"
        for i, lone in enumerate(alone):
            torch.testing.assert_close(preds[i]["tokens"].to(device), lone.last_hidden_state[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(preds[i]["pooled"].to(device), lone.pooler_output[0], atol=1e-4, rtol=1e-4)
    print(f"bert: {len(data)} examples in shuffled batches of {BATCH} from 2 workers, padded and packed: every "
          f"per-token and pooled output matches the model run alone on {device}")


if __name__ == "__main__":
    run(torch.device(sys.argv[1]))
