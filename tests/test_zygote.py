"""The tests' zygote (tests/zygote.py) forks ranks that behave as processes of their own: the
request's arguments, environment and working directory; exit codes, including a signal's, as
subprocess reports them; stdout and stderr in their files."""
import signal

from train_helpers import env, zygote_for
from zygote import key


def test_a_forked_rank_runs_its_module_as_python_m_would(tmp_path):
    base = env([])
    zygote = zygote_for(base)
    assert zygote is not None and zygote_for(env(["train.compile=true"])) is None     # TorchDynamo on: no fork
    # the rank variables are a fork's own; any other variable could change what the imports did
    assert key({**base, "RANK": "1", "MASTER_PORT": "1"}) == zygote.key != key({**base, "OTHER": "1"})

    def run(module, args):
        out, err = tmp_path / f"{len(list(tmp_path.iterdir()))}.out", tmp_path / "err"
        rank = zygote.spawn(module, args, {**base, "RANK": "3"}, str(tmp_path), str(out), str(err))
        return rank, out, err

    rank, out, err = run("pldr_dist.train", ["--help"])
    assert rank.wait(timeout=60) == 0 and out.read_text().startswith("usage: pldr-train")
    rank, out, err = run("pldr_dist.train", ["--config", "missing.yaml"])
    assert rank.wait(timeout=60) == 2
    assert err.read_text().strip().splitlines()[-1].startswith("pldr-train: ") and "missing.yaml" in err.read_text()
    probe = "import os, sys; sys.stdout.write(os.environ['RANK'] + ' ' + os.getcwd() + ' ')"
    rank, out, err = run("timeit", ["-n", "1", probe])
    assert rank.wait(timeout=60) == 0 and out.read_text().startswith(f"3 {tmp_path} ")
    rank, out, err = run("timeit", ["-n", "1", "import time; time.sleep(60)"])
    assert rank.poll() is None
    rank.send_signal(signal.SIGKILL)
    assert rank.wait(timeout=30) == -signal.SIGKILL
