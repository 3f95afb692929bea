"""The shard manifest: what a directory of token shards holds, and how to check it.

manifest.json (written last, atomically, by the shard writer):
    {"format": "pldr-token-shards/1", "seq_len": S, "sample_len": S+1, "dtype": "uint16",
     "tokenizer": {"fingerprint": sha256, "vocab_size": V, "pad_id": 0, "eos_id": 3},
     "splits": {"train": [{"name", "samples", "tokens", "sha256"}, ...], "valid": [...]},
     "documents": {"train": n, "valid": n}, "dropped_tail_tokens": {...}, "args": {...}}
Each sample is one tar member `<key>.tokens.<dtype>` holding S+1 little-endian token ids.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass

from pldr_dist.errors import PLDRError, cli_main

FORMAT = "pldr-token-shards/1"
SPLITS = ("train", "valid")


class ShardError(PLDRError, ValueError):
    """A shard or manifest is missing, corrupt or does not fit the run (message names the file)."""


DataError = ShardError  # the name the trainer uses


@dataclass
class Manifest:
    path: str
    data: dict

    @property
    def root(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    @property
    def seq_len(self) -> int:
        return self.data["seq_len"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def fingerprint(self) -> str:
        return self.data["tokenizer"]["fingerprint"]

    def shards(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ShardError(f"ShardError: split={split!r} is not one of {SPLITS}")
        return self.data["splits"][split]

    @classmethod
    def load(cls, path_or_dir: str) -> "Manifest":
        path = os.path.join(path_or_dir, "manifest.json") if os.path.isdir(path_or_dir) else path_or_dir
        if not os.path.isfile(path):
            raise ShardError(f"ShardError: {path}: no manifest (write shards with pldr-make-shards first)")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ShardError(f"ShardError: {path}: not valid JSON ({exc}); re-run pldr-make-shards") from None
        if data.get("format") != FORMAT:
            raise ShardError(f"ShardError: {path}: format={data.get('format')!r}, expected {FORMAT!r}")
        return cls(path, data)

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def load_manifest(path_or_dir: str) -> Manifest:
    return Manifest.load(path_or_dir)


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_shards(manifest: Manifest, progress: bool = True) -> list[str]:
    """Check every shard's presence and sha256 against the manifest; return one line per problem."""
    problems = []
    entries = [(s, e) for s in SPLITS for e in manifest.shards(s)]
    try:
        from tqdm import tqdm
        entries = tqdm(entries, desc="verify", unit="shard", disable=not progress)
    except ImportError:
        pass
    for split, entry in entries:
        path = os.path.join(manifest.root, entry["name"])
        if not os.path.isfile(path):
            problems.append(f"ShardError: {path}: missing ({split} shard listed in {manifest.path})")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"ShardError: {path}: sha256 differs from {manifest.path} (corrupt; re-run pldr-make-shards)")
    return problems


@cli_main("pldr-verify-shards")
def verify_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="pldr-verify-shards",
                                description="Check every token shard against its manifest.json (presence and sha256).")
    p.add_argument("manifest", help="manifest.json or the directory holding it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    m = Manifest.load(args.manifest)
    problems = verify_shards(m, progress=not args.quiet)
    for line in problems:
        print(line, file=sys.stderr)
    counts = {s: (len(m.shards(s)), sum(e["samples"] for e in m.shards(s))) for s in SPLITS}
    summary = ", ".join(f"{s}: {n} shards / {k} samples" for s, (n, k) in counts.items())
    print(f"{m.path}: {summary}, seq_len {m.seq_len}, {m.dtype}: "
          + (f"{len(problems)} problem(s)" if problems else "all shards OK"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    verify_main()
