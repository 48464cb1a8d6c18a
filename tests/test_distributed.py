"""Recorder.gather over torch.distributed: gloo on 127.0.0.1, worlds of 1 to 4 ranks.

One spawned world of 4 ranks runs every scenario in process groups of 1, 2, 3 and 4 ranks (the
last one the default group) and checks that each rank's ``gather()`` equals the single-process
result: one Recorder fed every rank's batches, rank after rank (what ``"first"`` and ``"last"``
mean across ranks). Datasets of 103 items divide by no world size; outputs come from the very
batches each rank ran, so equality is exact.
"""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import provcollate as pc

N = 103
WORLD = 4
WORLD_TIMEOUT = 100  # seconds for the whole world (spawn, every scenario, shutdown): a hang fails
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


# --------------------------------------------------------------------------------------------
# data and models, identical in every process
# --------------------------------------------------------------------------------------------

class Points(Dataset):
    """Item i: a [4] float vector; with ``noise``, a random augmentation (seeded per view by Indexed)."""

    def __init__(self, noise=False):
        self.base = torch.randn(N, 4, generator=torch.Generator().manual_seed(0))
        self.noise = noise

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.base[i] + (0.5 * torch.randn(4) if self.noise else 0)


class Seqs(Dataset):
    """Item i: ``{"ids": [L_i] float}`` with L_i in 1..12; with ``noise``, augmented per view."""

    def __init__(self, n=N, noise=False):
        g = torch.Generator().manual_seed(1)
        self.lengths = torch.randint(1, 13, (n,), generator=g).tolist()
        self.rows = [torch.randn(length, generator=g) for length in self.lengths]
        self.noise = noise

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = self.rows[i] + (0.5 * torch.randn(len(self.rows[i])) if self.noise else 0)
        return {"ids": ids}


W = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))


def point_model(batch):
    return batch.data @ W


def seq_model(batch):
    ids = batch.data["ids"]
    tok = torch.stack([ids * 2, ids.sin(), ids.cumsum(1)], -1)
    return {"tok": tok, "label": (ids.sum(1) > 0).long()}


def loader(dataset, sampler=None, batch_sampler=None, left=False):
    # Bucketed batches often hold one length: naming the field keeps lengths in every batch.
    primary = "ids" if isinstance(dataset[0].data, dict) else None
    collate = pc.Collator(padding_side="left" if left else "right", primary=primary)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate)
    return DataLoader(dataset, batch_size=8, sampler=sampler, collate_fn=collate)


def record(rec, batches, model, **add_kwargs):
    for batch in batches:
        rec.add(batch, model(batch), **add_kwargs)
    return rec


def assert_same(got, expected):
    """Two Predictions are equal: entries, views, outputs (dtypes, values), num_items."""
    assert got is not None
    assert torch.equal(got.index, expected.index)
    assert (got.view is None) == (expected.view is None)
    if got.view is not None:
        assert torch.equal(got.view, expected.view)
    assert got.names == expected.names and got.per_token == expected.per_token
    assert got.num_items == expected.num_items and got.stacked_views == expected.stacked_views
    for name in got.names:
        if name in got.per_token:
            (gv, go), (ev, eo) = got.jagged(name), expected.jagged(name)
            assert torch.equal(go, eo) and gv.dtype == ev.dtype and torch.equal(gv, ev), name
        else:
            g, e = got.tensor(name), expected.tensor(name)
            assert g.dtype == e.dtype and torch.equal(g, e), name
    # the input fingerprints and the checks made with them, as one process sees them
    assert (got.fingerprints is None) == (expected.fingerprints is None)
    if got.fingerprints is not None:
        assert torch.equal(got.fingerprints, expected.fingerprints)
    gs, es = got.summary(), expected.summary()
    assert (gs.conflicts, sorted(gs.conflicted), gs.disagreements) == (es.conflicts, sorted(es.conflicted), es.disagreements)


def every_rank(world, batches):
    """The batches of every rank (each rank makes them all, for its single-process reference)."""
    return [list(batches(r)) for r in range(world)]


def check(rank, world, group, per_rank, model, rec_kwargs, add_kwargs=None, dst=None):
    """This rank's gather() against one Recorder fed the batches of every rank, in rank order."""
    add_kwargs = add_kwargs or {}
    rec = record(pc.Recorder(**rec_kwargs), per_rank[rank], model, **add_kwargs)
    got = rec.gather(dst=dst, group=group)
    expected = pc.Recorder(**rec_kwargs)
    for r in range(world):
        record(expected, per_rank[r], model, **add_kwargs)
    if dst is not None and rank != dst:
        assert got is None
    else:
        assert_same(got, expected.result())
    return rec


# --------------------------------------------------------------------------------------------
# scenarios: each runs on every rank
# --------------------------------------------------------------------------------------------

def distributed_sampler_padding(rank, world, group, tmp):
    """Shuffled DistributedSampler with drop_last=False: ranks padded with repeats, merged by policy."""
    ds = pc.Indexed(Points())

    def batches(r):
        return loader(ds, DistributedSampler(ds, num_replicas=world, rank=r, shuffle=True, seed=3))

    batches = every_rank(world, batches)
    for policy in ("first", "last", "mean"):
        check(rank, world, group, batches, point_model, {"num_items": N, "on_duplicate": policy})
    check(rank, world, group, batches, point_model, {"num_items": N, "on_duplicate": "first"}, dst=world - 1)
    # Under "error" the padding repeats are an error, raised alike on every rank (no hang); the
    # Recorder warned at once (the default world does not divide N), and the message says how to
    # recover: rec.on_duplicate = "first", then gather() again.
    with pytest.warns(RuntimeWarning, match="DistributedSampler pads the ranks with"):
        rec = pc.Recorder(num_items=N)
    record(rec, batches[rank], point_model)
    if N % world:
        with pytest.raises(ValueError, match="recorded more than once.*set rec.on_duplicate = 'first' and call gather"):
            rec.gather(group=group)
        rec.on_duplicate = "first"
        expected = pc.Recorder(num_items=N, on_duplicate="first")
        for r in range(world):
            record(expected, batches[r], point_model)
        got = rec.gather(group=group)
        assert_same(got, expected.result())
        assert got.summary().repeats == world - N % world and got.summary().ranks == world
    else:
        assert len(rec.gather(group=group)) == N


def distributed_sampler_drop_last(rank, world, group, tmp):
    """drop_last=True: no repeats, some items never recorded; num_items unknown (storage grows)."""
    ds = pc.Indexed(Points())

    def batches(r):
        return loader(ds, DistributedSampler(ds, num_replicas=world, rank=r, shuffle=True, seed=4, drop_last=True))

    batches = every_rank(world, batches)
    check(rank, world, group, batches, point_model, {})
    got = check(rank, world, group, batches, point_model, {"num_items": N}).gather(group=group)
    assert len(got.missing()) == N % world


def length_buckets_per_token(rank, world, group, tmp):
    """LengthBucketSampler sharding, per-token and per-example outputs together, left padding."""
    seqs = Seqs()
    ds = pc.Indexed(seqs)

    def batches(r):
        sampler = pc.LengthBucketSampler(seqs.lengths, max_tokens=40, shuffle=True, seed=5, num_replicas=world, rank=r)
        return loader(ds, batch_sampler=sampler, left=True)

    batches = every_rank(world, batches)
    check(rank, world, group, batches, seq_model, {"num_items": N}, {"per_token": {"tok"}})
    check(rank, world, group, batches, seq_model, {"num_items": N, "reduce": "topk:2"}, {"per_token": {"tok"}}, dst=0)


def views(rank, world, group, tmp):
    """Test-time augmentation views of one item land on different ranks; combined after the merge."""
    points = pc.Indexed(Points(noise=True), views=3, seed=6)
    seqs = pc.Indexed(Seqs(noise=True), views=2, seed=7)

    def point_batches(r):
        return loader(points, DistributedSampler(points, num_replicas=world, rank=r, shuffle=True, seed=8))

    def seq_batches(r):
        return loader(seqs, DistributedSampler(seqs, num_replicas=world, rank=r, shuffle=True, seed=9))

    point_batches, seq_batches = every_rank(world, point_batches), every_rank(world, seq_batches)
    for how in ("mean", "stack", "none"):
        check(rank, world, group, point_batches, point_model, {"num_items": N, "on_duplicate": "first", "views": how})
        check(rank, world, group, seq_batches, seq_model, {"num_items": N, "on_duplicate": "last", "views": how}, {"per_token": {"tok"}})
    check(rank, world, group, point_batches, point_model, {"num_items": N, "on_duplicate": "first", "views": "vote", "reduce": "argmax"})


def empty_ranks(rank, world, group, tmp):
    """Ranks with nothing recorded (fewer batches than ranks), and a world that recorded nothing."""
    seqs = Seqs(n=2)
    ds = pc.Indexed(seqs)

    def batches(r):
        return loader(ds, batch_sampler=pc.LengthBucketSampler(seqs.lengths, batch_size=1, num_replicas=world, rank=r))

    check(rank, world, group, every_rank(world, batches), seq_model, {"num_items": 2}, {"per_token": {"tok"}})
    nothing = pc.Recorder(num_items=5).gather(group=group)
    assert len(nothing) == 0 and nothing.names == () and torch.equal(nothing.missing(), torch.arange(5))


def disagreement(rank, world, group, tmp):
    """Ranks whose Recorders differ fail alike, before any data moves."""
    if world == 1:
        return
    rec = pc.Recorder(num_items=N + rank)
    rec.add(torch.tensor([rank]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="same num_items"):
        rec.gather(group=group)
    rec = pc.Recorder(num_items=N)
    rec.add(torch.tensor([rank]), torch.ones(1, 2, dtype=torch.float64 if rank else torch.float32))
    with pytest.raises(ValueError, match="recorded different outputs"):
        rec.gather(group=group)


def streaming_shards(rank, world, group, tmp):
    """Every rank streams to one directory; gather() reads its shards back; Predictions.read merges all."""
    seqs = Seqs()
    ds = pc.Indexed(seqs)
    path = os.path.join(tmp, "shards")

    def batches(r):
        return loader(ds, DistributedSampler(ds, num_replicas=world, rank=r, shuffle=True, seed=10))

    batches = every_rank(world, batches)
    settings = {"num_items": N, "on_duplicate": "first"}
    rec = pc.Recorder(**settings)
    rec.write(path, every=25)
    record(rec, batches[rank], seq_model, per_token={"tok"})
    rec.write(path)
    got = rec.gather(group=group)
    expected = pc.Recorder(**settings)
    for r in range(world):
        record(expected, batches[r], seq_model, per_token={"tok"})
    expected = expected.result()
    assert_same(got, expected)
    dist.barrier(group)
    assert_same(pc.Predictions.read(path), expected)
    resumed = pc.Recorder(**settings, resume=path)
    assert bool(resumed.done(range(N)).all())
    assert_same(resumed.gather(group=group), expected)
    dist.barrier(group)


def misfiled_input(rank, world, group, tmp):
    """The last rank files another input under an id the first rank records: one conflict after
    gather(), as in one process; every fingerprint kept is that of the input kept."""
    ds = pc.Indexed(Points())

    def batches(r):
        own = list(loader(ds, DistributedSampler(ds, num_replicas=world, rank=r, shuffle=False)))
        if r == world - 1 and world > 1:
            own.append(pc.Collator()([pc.Sample(0, 0, ds[1].data)]))  # item 1's input under id 0 (rank 0's)
        return own

    batches = every_rank(world, batches)
    for policy in ("first", "last"):
        got = check(rank, world, group, batches, point_model, {"num_items": N, "on_duplicate": policy}).gather(group=group)
        assert got.summary().conflicts == (1 if world > 1 else 0)


SCENARIOS = [distributed_sampler_padding, distributed_sampler_drop_last, length_buckets_per_token, views,
             empty_ranks, disagreement, streaming_shards, misfiled_input]


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        for size in range(1, world + 1):
            # Every rank creates every group, in the same order; the whole world uses the default group.
            group = None if size == world else dist.new_group(list(range(size)))
            if rank < size:
                for scenario in SCENARIOS:
                    try:
                        scenario(rank, size, group, os.path.join(tmp, f"world{size}"))
                    except BaseException as exc:
                        raise AssertionError(f"rank {rank} of a world of {size}: {scenario.__name__} failed") from exc
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world, *args):
    """Run ``worker(rank, world, port, *args)`` on ``world`` processes; a hang fails after WORLD_TIMEOUT."""
    ctx = mp.start_processes(worker, args=(world, _free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + WORLD_TIMEOUT
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{worker.__name__}: a world of {world} ranks did not finish within {WORLD_TIMEOUT} s")


def test_gather_equals_single_process_in_worlds_of_1_to_4(tmp_path):
    _spawn(_worker, WORLD, str(tmp_path))


def _nccl_worker(rank, world, port):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        seqs = Seqs()
        ds = pc.Indexed(seqs)
        per_rank = every_rank(world, lambda r: loader(ds, DistributedSampler(ds, num_replicas=world, rank=r, shuffle=True)))
        per_rank = [[batch.to("cuda") for batch in batches] for batches in per_rank]
        got = check(rank, world, None, per_rank, seq_model, {"num_items": N, "on_duplicate": "first", "device": "cuda"},
                    {"per_token": {"tok"}}).gather()
        assert got.tensor("label").is_cuda and got.jagged("tok")[0].is_cuda  # kept on the GPU throughout
        check(rank, world, None, per_rank, seq_model, {"num_items": N, "on_duplicate": "mean"}, {"per_token": {"tok"}})
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_nccl_gather_of_gpu_storage():
    _spawn(_nccl_worker, min(2, torch.cuda.device_count()))


# --------------------------------------------------------------------------------------------
# single process: gather() without a process group, and its argument checks
# --------------------------------------------------------------------------------------------

def test_gather_without_process_group_is_result():
    rec = pc.Recorder(num_items=4)
    rec.add(torch.tensor([2, 0]), torch.tensor([[1.0], [2.0]]))
    assert_same(rec.gather(), rec.result())
    assert_same(rec.gather(dst=0), rec.result())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dst": 1}, ValueError, "one process, rank 0"),
    ({"dst": "0"}, TypeError, "dst must be a global rank"),
    ({"dst": True}, TypeError, "got bool"),
    ({"group": object()}, ValueError, "needs torch.distributed"),
])
def test_gather_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pc.Recorder().gather(**kwargs)
