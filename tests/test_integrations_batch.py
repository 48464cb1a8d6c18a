"""A Batch as the libraries see it: mapping protocol, unpacking, and identity through their device moves."""
import pickle

import pytest
import torch

import provcollate as pc

accelerate_ops = pytest.importorskip("accelerate.utils.operations")
lightning_data = pytest.importorskip("lightning.pytorch.utilities.data")
lightning_apply = pytest.importorskip("lightning.fabric.utilities.apply_func")


def dict_batch():
    samples = [{"input_ids": list(range(1, n + 1)), "attention_mask": [1] * n, "labels": n % 2} for n in (3, 1, 4)]
    return pc.Collator(pad_values={"attention_mask": 0})(list(pc.Indexed(samples))[::-1])


def assert_same_identity(moved, batch, device):
    assert moved.index.device.type == device and moved["input_ids"].device.type == device
    for name in ("host_index", "host_lengths", "host_view"):
        assert getattr(moved, name).device.type == "cpu"
        assert torch.equal(getattr(moved, name), getattr(batch, name))
    assert moved.max_len == batch.max_len and moved.padding_side == batch.padding_side
    assert set(moved.field_lengths) == set(batch.field_lengths) and moved.mask is not None
    assert list(moved.keys()) == list(batch.keys())


def test_dict_batch_is_a_read_only_mapping_of_its_fields():
    batch = dict_batch()
    assert len(batch) == 3 and batch.index.tolist() == [2, 1, 0]
    assert list(batch.keys()) == ["input_ids", "attention_mask", "labels"]
    assert "labels" in batch and "index" not in batch and "mask" not in batch
    assert batch.get("labels") is batch["labels"] and batch.get("nope", 7) == 7
    assert [k for k, _ in batch.items()] == list(batch.keys())
    assert all(a is b for a, b in zip(batch.values(), batch.data.values()))
    assert dict(batch).keys() == batch.data.keys()

    def model(input_ids, attention_mask, labels):
        return input_ids.sum(1), labels

    sums, labels = model(**batch)
    assert sums.tolist() == [10, 1, 6] and labels.tolist() == [0, 1, 1]
    ids, mask, labels = batch  # iteration yields fields (values), never rows
    assert ids is batch["input_ids"] and ids.shape == (3, 4)
    with pytest.raises(TypeError):
        batch["labels"] = None


def test_tuple_batch_unpacks_like_its_data_and_has_no_keys():
    samples = [(torch.arange(n), float(n)) for n in (2, 5)]
    batch = pc.Collator()(list(pc.Indexed(samples)))
    x, y = batch
    assert x.shape == (2, 5) and y.tolist() == [2.0, 5.0] and len(batch) == 2
    assert "0" not in batch and 0 not in batch
    with pytest.raises(TypeError, match=r"Batch.keys: needs a batch whose data is a dict of fields, got data of type tuple"):
        batch.keys()
    with pytest.raises(TypeError, match="Batch.get"):
        batch.get(0)
    with pytest.raises(TypeError):
        {**batch}


def test_tensor_batch_is_its_one_field():
    batch = pc.Collator()(list(pc.Indexed([torch.ones(3), torch.ones(2)])))
    (x,) = batch
    assert x is batch.data and len(batch) == 2 and list(batch) == [batch.data]


def test_identity_survives_accelerate_send_to_device():
    batch = dict_batch()
    moved = accelerate_ops.send_to_device(batch, torch.device("meta"))
    assert isinstance(moved, pc.Batch)
    assert_same_identity(moved, batch, "meta")
    nested = accelerate_ops.send_to_device({"batch": batch}, torch.device("meta"), skip_keys="other")
    assert_same_identity(nested["batch"], batch, "meta")


def test_identity_survives_lightning_move_and_batch_size_inference():
    batch = dict_batch()
    moved = lightning_apply.move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, pc.Batch)
    assert_same_identity(moved, batch, "meta")
    assert lightning_data.extract_batch_size(batch) == 3
    tuple_batch = pc.Collator()(list(pc.Indexed([(torch.ones(n, 2), n) for n in (1, 2, 3, 4, 5)])))
    assert lightning_data.extract_batch_size(tuple_batch) == 5


def test_identity_survives_transformers_prepare_inputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=transformers.BertForSequenceClassification(config), args=args)
    batch = dict_batch()
    prepared = trainer._prepare_inputs(batch)
    assert isinstance(prepared, pc.Batch)
    assert_same_identity(prepared, batch, "cpu")
    assert_same_identity(pickle.loads(pickle.dumps(prepared)), batch, "cpu")
