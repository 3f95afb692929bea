"""Shard writer: exact packing, resumable after an interruption, verification, prepare_corpus."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from pldr_dist.data import shard_writer
from pldr_dist.data.corpus import iter_documents
from pldr_dist.data.manifest import Manifest, ShardError, verify_main, verify_shards
from pldr_dist.data.shard_writer import is_valid_document, make_shards
from pldr_dist.data.tokenizer import Tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt")
SEQ_LEN, PER_SHARD, VALID = 32, 40, 0.1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~100 kB of the bundled corpus as JSON-lines, and a 400-piece tokenizer trained on it."""
    d = tmp_path_factory.mktemp("shards")
    docs = []
    for doc in iter_documents(SHAKESPEARE):
        docs.append(doc)
        if sum(map(len, docs)) > 100_000:
            break
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    train_tokenizer(str(d / "docs.jsonl"), str(d / "tok.model"), vocab_size=400)
    return d, docs


def read_samples(manifest: Manifest, split: str) -> np.ndarray:
    rows = []
    for entry in manifest.shards(split):
        with tarfile.open(os.path.join(manifest.root, entry["name"])) as tar:
            names = [m.name for m in tar]
            assert names == sorted(names) and all(n.endswith(".tokens.u16") for n in names)
            rows += [np.frombuffer(tar.extractfile(m).read(), dtype="<u2") for m in tar]
    return np.stack(rows)


def test_packing_is_the_exact_concatenation_of_documents_plus_eos(corpus, tmp_path):
    d, docs = corpus
    m = make_shards(str(d / "docs.jsonl"), str(d / "tok.model"), str(tmp_path / "out"), SEQ_LEN, PER_SHARD,
                    VALID, num_procs=2, show_progress=False)
    tok = Tokenizer.from_file(str(d / "tok.model"))
    assert m.dtype == "uint16" and m.seq_len == SEQ_LEN and m.fingerprint == tok.fingerprint
    for split in ("train", "valid"):
        mine = [t for i, t in enumerate(docs) if (split == "valid") == is_valid_document(i, VALID)]
        stream = np.concatenate([tok.encode(t) + [tok.eos_id] for t in mine])
        samples = read_samples(m, split)
        n_full = len(stream) // (SEQ_LEN + 1)
        assert samples.shape == (n_full, SEQ_LEN + 1)
        np.testing.assert_array_equal(samples.reshape(-1), stream[: samples.size])
        assert m.data["dropped_tail_tokens"][split] == len(stream) - samples.size < SEQ_LEN + 1
        assert m.data["documents"][split] == len(mine)
        assert [e["samples"] for e in m.shards(split)][:-1] == [PER_SHARD] * (len(m.shards(split)) - 1)
    assert len(m.shards("valid")) >= 2 and len(m.shards("train")) > 10
    assert verify_shards(m, progress=False) == []


def test_interrupted_writer_resumes_without_duplicating_or_losing_documents(corpus, tmp_path, monkeypatch):
    d, _ = corpus
    args = (str(d / "docs.jsonl"), str(d / "tok.model"))
    reference = make_shards(*args, str(tmp_path / "ref"), SEQ_LEN, PER_SHARD, VALID, show_progress=False)

    out = tmp_path / "interrupted"
    real_write, written = shard_writer.write_shard, []

    def crash_after_seven(path, samples, first_index):
        if len(written) == 7:
            with open(path + ".tmp", "wb") as f:  # a half-written shard, as a kill would leave it
                f.write(b"partial")
            raise KeyboardInterrupt("simulated kill")
        written.append(path)
        return real_write(path, samples, first_index)

    monkeypatch.setattr(shard_writer, "write_shard", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        make_shards(*args, str(out), SEQ_LEN, PER_SHARD, VALID, show_progress=False)
    monkeypatch.setattr(shard_writer, "write_shard", real_write)
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.tar"))) == 7
    # a shard damaged after it was recorded must be rewritten, not trusted
    damaged = sorted(out.glob("train-*.tar"))[3]
    damaged.write_bytes(damaged.read_bytes()[:-10])

    resumed = make_shards(*args, str(out), SEQ_LEN, PER_SHARD, VALID, num_procs=2, show_progress=False)
    for split in ("train", "valid"):
        assert resumed.shards(split) == reference.shards(split)  # same names, counts and sha256
        np.testing.assert_array_equal(read_samples(resumed, split), read_samples(reference, split))
    assert resumed.data["documents"] == reference.data["documents"]
    assert not list(out.glob("*.tmp")) and not (out / ".progress.json").exists()
    # re-running a finished job is a no-op; other arguments in the same directory are refused
    assert make_shards(*args, str(out), SEQ_LEN, PER_SHARD, VALID, show_progress=False).data["splits"] == resumed.data["splits"]
    with pytest.raises(ShardError, match=r"manifest\.json: shards made with other arguments"):
        make_shards(*args, str(out), SEQ_LEN + 1, PER_SHARD, VALID, show_progress=False)


def test_verify_reports_corrupted_and_missing_shards(corpus, tmp_path, capsys):
    d, _ = corpus
    out = tmp_path / "out"
    m = make_shards(str(d / "docs.jsonl"), str(d / "tok.model"), str(out), SEQ_LEN, PER_SHARD, VALID, show_progress=False)
    with pytest.raises(SystemExit) as ok:
        verify_main([str(out), "--quiet"])
    assert ok.value.code == 0 and "all shards OK" in capsys.readouterr().out
    victim = out / m.shards("train")[2]["name"]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF  # one flipped byte inside a token payload
    victim.write_bytes(bytes(data))
    (out / m.shards("valid")[0]["name"]).unlink()
    problems = verify_shards(Manifest.load(str(out)), progress=False)
    assert len(problems) == 2
    assert "train-000002.tar: sha256 differs" in problems[0] and "valid-000000.tar: missing" in problems[1]
    with pytest.raises(SystemExit) as bad:
        verify_main([str(out / "manifest.json"), "--quiet"])
    assert bad.value.code == 1 and "2 problem(s)" in capsys.readouterr().out


def test_command_line_tools_show_help_and_write_a_summary(corpus, tmp_path):
    d, _ = corpus
    env = {**os.environ, "PYTHONPATH": ROOT}
    from pldr_dist.data import tokenizer
    for tool in (tokenizer.main, shard_writer.main, verify_main):
        with pytest.raises(SystemExit) as exit_info:
            tool(["--help"])
        assert exit_info.value.code == 0
    r = subprocess.run([sys.executable, "-m", "pldr_dist.data.shard_writer", str(d / "docs.jsonl"), "--tokenizer",
                        str(d / "tok.model"), "--out", str(tmp_path / "cli"), "--seq-len", "32", "--procs", "1",
                        "--samples-per-shard", "40", "--valid-fraction", "0.1"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "train:" in r.stdout and "MB/s" in r.stdout


def test_prepare_corpus_tokenises_and_shards_the_bundled_corpus(tmp_path):
    from pldr_dist.data import prepare_corpus
    prepared = prepare_corpus(SHAKESPEARE, str(tmp_path / "demo"), vocab_size=512, seq_len=64, log=lambda line: None)
    tok = Tokenizer(prepared.tokenizer)
    m = Manifest.load(prepared.manifest)
    assert tok.vocab_size == 512 and m.fingerprint == tok.fingerprint and m.seq_len == 64
    assert len(m.shards("valid")) >= 4 and sum(e["samples"] for e in m.shards("train")) > 5000
    assert verify_shards(m, progress=False) == []


def test_the_paper_tokenizer_drives_the_shard_writer_and_loader(corpus, tmp_path):
    from pldr_dist.data.loader import TokenLoader
    d, docs = corpus
    paper = os.path.join(ROOT, "data", "reference", "refinedweb-tokenizer-pldrllm-paper.model")
    m = make_shards(str(d / "docs.jsonl"), paper, str(tmp_path / "paper"), 63, 20, 0.2, show_progress=False)
    tok = Tokenizer.from_file(paper)
    assert m.dtype == "uint16" and m.fingerprint == tok.fingerprint and m.data["tokenizer"]["vocab_size"] == 32000
    first = [t for i, t in enumerate(docs) if not is_valid_document(i, 0.2)][:3]
    stream = np.concatenate([tok.encode(t) + [tok.eos_id] for t in first])
    batch = next(iter(TokenLoader(str(tmp_path / "paper"), "valid", 2, 63, tokenizer_fingerprint=tok.fingerprint)))
    np.testing.assert_array_equal(read_samples(m, "train").reshape(-1)[: len(stream)], stream)
    valid = [t for i, t in enumerate(docs) if is_valid_document(i, 0.2)]
    valid_stream = np.concatenate([tok.encode(t) + [tok.eos_id] for t in valid])
    np.testing.assert_array_equal(batch["input"].numpy().reshape(-1), np.concatenate(
        [valid_stream[0:63], valid_stream[64:127]]))
