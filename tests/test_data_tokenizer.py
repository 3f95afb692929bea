"""Tokenizer: the paper's settings and special ids, streaming inputs, the paper's own model."""
import gzip
import json
import os

import pytest
import zstandard
from sentencepiece.sentencepiece_model_pb2 import ModelProto

from pldr_dist.data.corpus import CorpusError, iter_documents
from pldr_dist.data.tokenizer import Tokenizer, TokenizerError, main, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt")
PAPER_MODEL = os.path.join(ROOT, "data", "reference", "refinedweb-tokenizer-pldrllm-paper.model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first ~120 kB of the bundled corpus as .txt, split .txt parts, .jsonl.gz and .jsonl.zst."""
    d = tmp_path_factory.mktemp("corpus")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read(120_000)
    text = text[: text.rfind("\n\n")] + "\n\nIn 1599 and 2024, 36 of 154 sonnets; 2024 is 2000 + 24.\n" * 20
    (d / "all.txt").write_text(text, encoding="utf-8")
    paragraphs = text.split("\n\n")
    half = len(paragraphs) // 2
    (d / "part1.txt").write_text("\n\n".join(paragraphs[:half]) + "\n", encoding="utf-8")
    (d / "part2.txt").write_text("\n\n".join(paragraphs[half:]), encoding="utf-8")
    lines = "".join(json.dumps({"text": p.strip("\n"), "id": i}) + "\n" for i, p in enumerate(paragraphs))
    with gzip.open(d / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (d / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
    return d


def test_trained_tokenizer_has_paper_settings_and_special_ids(corpus, tmp_path):
    tok = train_tokenizer(str(corpus / "all.txt"), str(tmp_path / "t.model"), vocab_size=400)
    assert tok.vocab_size == 400
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[UNK]", "[START]", "[END]"]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    # byte fallback: an unseen character becomes its UTF-8 bytes, not [UNK], and round-trips
    snow = tok.encode("☃")
    assert tok.unk_id not in snow and [tok.id_to_piece(i) for i in snow][-3:] == ["<0xE2>", "<0x98>", "<0x83>"]
    assert tok.decode(snow) == "☃"
    # split digits: every digit is its own piece (the corpus has digits, see the fixture)
    assert [p for p in map(tok.id_to_piece, tok.encode("in 2024")) if p.strip("▁")][-4:] == ["2", "0", "2", "4"]
    spec = ModelProto()
    spec.ParseFromString(tok.model_proto)
    assert spec.trainer_spec.model_type == 1  # UNIGRAM
    assert spec.trainer_spec.split_digits and spec.trainer_spec.byte_fallback
    assert spec.normalizer_spec.name == "nmt_nfkc"
    # nmt_nfkc: full-width letters normalise to ASCII
    assert tok.encode("ｋｉｎｇ") == tok.encode("king")
    assert Tokenizer.from_file(str(tmp_path / "t.model")).fingerprint == tok.fingerprint


def test_jsonl_gz_zst_and_globbed_text_train_the_same_tokenizer(corpus, tmp_path):
    prints = {name: train_tokenizer(inputs, str(tmp_path / f"{name}.model"), 400).fingerprint
              for name, inputs in [("txt", str(corpus / "all.txt")), ("glob", str(corpus / "part*.txt")),
                                   ("gz", str(corpus / "docs.jsonl.gz")), ("zst", str(corpus / "docs.jsonl.zst"))]}
    assert len(set(prints.values())) == 1, prints
    assert list(iter_documents(str(corpus / "docs.jsonl.zst"))) == list(iter_documents(str(corpus / "part*.txt")))


def test_paper_tokenizer_loads_and_round_trips_text():
    tok = Tokenizer.from_file(PAPER_MODEL)
    assert tok.vocab_size == 32000
    assert [tok.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[START]", "[END]", "[SEP]"]
    text = "The PLDR-LLM was trained on 8 billion tokens of RefinedWeb in 2024."
    ids = tok.encode(text)
    assert tok.unk_id not in ids and tok.decode(ids) == text
    tok.check_compatible(pad_id=0, eos_id=3, vocab_size=32000)


def test_tokenizer_with_other_pad_or_eos_ids_is_refused():
    tok = Tokenizer.from_file(PAPER_MODEL)
    with pytest.raises(TokenizerError, match=r"refinedweb.*eos_id=3 but model\.eos_id=2"):
        tok.check_compatible(pad_id=0, eos_id=2)
    with pytest.raises(TokenizerError, match=r"pad_id=0 but model\.pad_id=5"):
        tok.check_compatible(pad_id=5, eos_id=3)
    with pytest.raises(TokenizerError, match=r"32000 pieces do not fit model\.vocab_size=512"):
        tok.check_compatible(pad_id=0, eos_id=3, vocab_size=512)


def test_bad_inputs_are_refused_naming_the_file(tmp_path):
    with pytest.raises(CorpusError, match="nothing-here-.*no file matches"):
        list(iter_documents(str(tmp_path / "nothing-here-*.txt")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not a JSON object with a 'text' field"):
        list(iter_documents(str(bad)))
    with pytest.raises(TokenizerError, match="missing.model: no such tokenizer"):
        Tokenizer.from_file(str(tmp_path / "missing.model"))


def test_train_tokenizer_cli_prints_summary(corpus, tmp_path, capsys):
    main([str(corpus / "all.txt"), "--out", str(tmp_path / "cli.model"), "--vocab-size", "400", "--threads", "1"])
    out = capsys.readouterr().out
    assert "400 pieces" in out and "[PAD]=0 [UNK]=1 [START]=2 [END]=3" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_too_small_vocab_is_refused_with_the_reason(corpus, tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size=100 failed: .*256 bytes \+ 4 specials"):
        train_tokenizer(str(corpus / "all.txt"), str(tmp_path / "small.model"), vocab_size=100)
