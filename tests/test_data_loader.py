"""TokenLoader: exact resume (any worker count, across epochs), DP-invariant global batches, refusals, skip policy."""
import hashlib
import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from pldr_dist.data.corpus import iter_documents
from pldr_dist.data.loader import BatchesAhead, TokenLoader
from pldr_dist.data.manifest import ShardError
from pldr_dist.data.shard_writer import make_shards
from pldr_dist.data.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt")
SEQ, B = 16, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """~60 kB of the bundled corpus in shards of 30 samples of 17 tokens."""
    d = tmp_path_factory.mktemp("loader")
    docs = list(itertools.islice(iter_documents(SHAKESPEARE), 280))
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    train_tokenizer(str(d / "docs.jsonl"), str(d / "tok.model"), vocab_size=320)
    make_shards(str(d / "docs.jsonl"), str(d / "tok.model"), str(d / "out"), SEQ, 30, 0.1, show_progress=False)
    return d / "out"


def batches(loader, n):
    return [torch.cat([b["input"], b["target"][:, -1:]], dim=1) for b in itertools.islice(loader, n)]


def same_batches(got, want, n):
    """Both sequences hold exactly n batches, pairwise equal (zip alone passes a loader that stopped early)."""
    return len(got) == len(want) == n and all(torch.equal(a, b) for a, b in zip(got, want))


def all_samples(out, split="train", names=None):
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for e in manifest["splits"][split]:
        if names is None or e["name"] in names:
            with tarfile.open(out / e["name"]) as tar:
                rows += [np.frombuffer(tar.extractfile(m).read(), dtype="<u2") for m in tar]
    return np.stack(rows).astype(np.int64)


def sorted_rows(a):
    return a[np.lexsort(a.T[::-1])]


def test_resume_yields_the_uninterrupted_batches_across_an_epoch_boundary_with_any_worker_count(shards):
    make = lambda workers: TokenLoader(str(shards), "train", B, SEQ, seed=7, num_workers=workers)  # noqa: E731
    reference = make(0)
    per_epoch = reference.plan.samples_per_epoch
    total = per_epoch // B + 25  # runs past the first epoch boundary
    ref = batches(reference, total)
    # one epoch holds every sample of the rank exactly once, shuffled
    first_epoch = torch.cat(ref).numpy()[:per_epoch]
    np.testing.assert_array_equal(sorted_rows(first_epoch), sorted_rows(all_samples(shards)))
    assert not np.array_equal(first_epoch, all_samples(shards))
    for stop, workers_before, workers_after in [(total - 40, 2, 1), (total - 10, 1, 2), (7, 2, 0)]:
        first = make(workers_before)
        head = batches(first, stop)
        state = first.state_dict()
        resumed = make(workers_after)
        resumed.load_state_dict(state)
        tail = batches(resumed, total - stop)
        assert same_batches(head + tail, ref, total), (stop, workers_before, workers_after, len(head), len(tail))
    assert state["epoch"] == 0 and make(0).state_dict() == {"epoch": 0, "position": 0, "skipped_samples": 0}


def test_a_batch_prepared_ahead_is_the_first_one_a_resume_yields(shards):
    """The trainer builds the next batch during the backward pass (BatchesAhead.prepare); a
    checkpoint taken then must resume with that batch, not skip it."""
    make = lambda: TokenLoader(str(shards), "train", B, SEQ, seed=7, num_workers=2)  # noqa: E731
    ref = batches(make(), 12)
    ahead = BatchesAhead(make())
    assert ahead.peek() is None          # nothing prepared yet
    got = batches(ahead, 5)
    ahead.prepare()                      # batch 6 built, not yet taken
    ahead.prepare()                      # idempotent: still batch 6
    prepared = ahead.peek()              # what the trainer copies to the GPU during the backward
    state = ahead.state_dict()
    sixth = next(ahead)
    assert sixth is prepared and ahead.peek() is None
    got += batches([sixth], 1) + batches(ahead, 1)   # batches 6 and 7
    resumed = make()
    resumed.load_state_dict(state)
    assert same_batches(got, ref[:7], 7)
    assert same_batches(batches(resumed, 7), ref[5:12], 7)


def test_closing_the_batches_ahead_stops_and_joins_the_loaders_workers(shards):
    """The trainer closes its batches at the end: the DataLoader's workers end then, not at the
    interpreter's exit (where one still starting missed multiprocessing's SIGTERM and hung a run)."""
    import multiprocessing
    others = set(multiprocessing.active_children())     # e.g. the session's gloo worker groups
    ahead = BatchesAhead(TokenLoader(str(shards), "train", B, SEQ, seed=7, num_workers=2))
    next(ahead)
    ahead.prepare()
    workers = set(multiprocessing.active_children()) - others
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    ahead.close()
    assert not any(w.is_alive() for w in workers) and not set(multiprocessing.active_children()) & workers
    assert ahead.peek() is None


def test_processes_forked_by_a_rank_start_with_sigterm_at_its_default():
    """The rank's SIGTERM handler only sets a flag; a forked child (a DataLoader worker) that
    inherited it would ignore the SIGTERM that is meant to end it."""
    import signal

    from pldr_dist.train.trainer import default_signals_in_children
    before = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        default_signals_in_children()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if all(signal.getsignal(s) == signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGUSR1)) else 1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        signal.signal(signal.SIGTERM, before)


def test_batches_are_int64_inputs_with_next_token_targets(shards):
    batch = next(iter(TokenLoader(str(shards), "train", B, SEQ, seed=0)))
    assert batch["input"].shape == batch["target"].shape == (B, SEQ)
    assert batch["input"].dtype == batch["target"].dtype == torch.int64
    torch.testing.assert_close(batch["input"][:, 1:], batch["target"][:, :-1])


def test_order_depends_on_seed_and_epoch_and_validation_is_read_in_order(shards):
    a, b = (batches(TokenLoader(str(shards), "train", B, SEQ, seed=s), 5) for s in (1, 2))
    assert not torch.equal(torch.cat(a), torch.cat(b))
    loader = TokenLoader(str(shards), "train", B, SEQ, seed=1)
    epoch_batches = loader.plan.samples_per_epoch // B
    both = torch.cat(batches(loader, 2 * epoch_batches)).numpy()
    n = loader.plan.samples_per_epoch
    assert not np.array_equal(both[:100], both[n:n + 100])
    valid = torch.cat(batches(TokenLoader(str(shards), "valid", 1, SEQ), 20)).numpy()
    np.testing.assert_array_equal(valid, all_samples(shards, "valid")[:20])


def test_data_parallel_ranks_split_each_global_batch_and_replicas_see_identical_batches(shards):
    """Rank r of dp takes rows [r*B, (r+1)*B) of the dp=1 stream's global micro-batches: ranks are
    disjoint, together they see every sample once an epoch, and a global step's samples do not
    depend on the DP size (what lets a resharded checkpoint continue on the same batches)."""
    single = batches(TokenLoader(str(shards), "train", 2 * B, SEQ, seed=3), 20)
    assert len(single) == 20
    for dp in (2, 4):
        ranks = [batches(TokenLoader(str(shards), "train", 2 * B // dp, SEQ, dp_rank=r, dp_size=dp, seed=3), 20)
                 for r in range(dp)]
        for step, global_batch in enumerate(single):
            assert torch.equal(torch.cat([rank[step] for rank in ranks]), global_batch), (dp, step)
    # resuming a dp=1 run's loader state with dp=2 continues the same global stream
    first = TokenLoader(str(shards), "train", 2 * B, SEQ, seed=3)
    batches(first, 7)
    resumed = [TokenLoader(str(shards), "train", B, SEQ, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(first.state_dict())
    tails = [batches(loader, 5) for loader in resumed]
    assert all(torch.equal(torch.cat([tails[0][i], tails[1][i]]), single[7 + i]) for i in range(5))
    # the TP/PP ranks of one replica pass the same dp_rank: identical batches, whatever their workers
    replica = TokenLoader(str(shards), "train", B, SEQ, dp_rank=1, dp_size=2, seed=3, num_workers=2)
    again = TokenLoader(str(shards), "train", B, SEQ, dp_rank=1, dp_size=2, seed=3)
    assert same_batches(batches(replica, 30), batches(again, 30), 30)


def test_shards_are_streamed_from_pipe_urls(shards):
    local = batches(TokenLoader(str(shards), "train", B, SEQ, seed=5), 12)
    piped = TokenLoader(str(shards), "train", B, SEQ, seed=5, shard_location=f"pipe:cat {shards}/{{name}}")
    assert piped.plan.urls[0].startswith("pipe:cat ")
    assert same_batches(batches(piped, 12), local, 12)


def rewrite_shard(out, split, index, mutate_members, update_manifest):
    """Rewrite one shard with some members changed; optionally record its new sha256 in the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"][split][index]
    with tarfile.open(out / entry["name"]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in mutate_members(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (out / entry["name"]).write_bytes(buf.getvalue())
    if update_manifest:
        entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        (out / "manifest.json").write_text(json.dumps(manifest))
    return entry["name"]


def copy_of(shards, tmp_path, name="copy"):
    out = tmp_path / name
    out.mkdir()
    for f in shards.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_bad_input_is_refused_with_a_one_line_error_naming_the_file(shards, tmp_path):
    with pytest.raises(ShardError, match=r"manifest\.json: seq_len=16 but the run's seq_len=32"):
        TokenLoader(str(shards), "train", B, 32)
    with pytest.raises(ShardError, match=r"manifest\.json: shards were tokenised with tokenizer"):
        TokenLoader(str(shards), "train", B, SEQ, tokenizer_fingerprint="0" * 64)
    with pytest.raises(ShardError, match="nowhere.*no manifest"):
        TokenLoader(str(tmp_path / "nowhere"), "train", B, SEQ)

    out = copy_of(shards, tmp_path)
    (out / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar: shard listed in .*manifest\.json is missing"):
        TokenLoader(str(out), "train", B, SEQ)

    out = copy_of(shards, tmp_path, "damaged")
    bad = rewrite_shard(out, "valid", 0, lambda ms: ms[:-1] + [(ms[-1][0], ms[-1][1][:-2])], update_manifest=False)
    with pytest.raises(ShardError, match=rf"{bad}: sha256 differs from the manifest") as err:
        next(iter(TokenLoader(str(out), "valid", B, SEQ, num_workers=1)))
    assert "\n" not in str(err.value)
    rewrite_shard(out, "valid", 0, lambda ms: ms, update_manifest=True)  # checksum right, one sample 2 bytes short
    with pytest.raises(ShardError, match=rf"{bad}: member \S+\.tokens\.u16 is not a 17-token uint16 sample"):
        next(iter(TokenLoader(str(out), "valid", B, SEQ)))


def test_skip_policy_drops_corrupt_samples_and_counts_them(shards, tmp_path, caplog):
    out = copy_of(shards, tmp_path)
    good = all_samples(out, "valid")
    # two samples of the first validation shard lose bytes; the manifest's checksum no longer matches
    rewrite_shard(out, "valid", 0, lambda ms: [(n, d[:-4] if i in (3, 10) else d) for i, (n, d) in enumerate(ms)],
                  update_manifest=False)
    loader = TokenLoader(str(out), "valid", 1, SEQ, on_corrupt="skip")
    got = torch.cat(batches(loader, 40)).numpy()
    expected = np.delete(good, [3, 10], axis=0)[:40]
    np.testing.assert_array_equal(got, expected)
    assert loader.skipped_samples == 2 and loader.state_dict()["skipped_samples"] == 2
    assert "skipped 2 corrupt samples" in caplog.text
