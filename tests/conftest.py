import os
import sys

# Tests import the package and their helpers from this checkout, installed or not.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _default_dtype_is_restored():
    """A test that changes torch's default dtype must not change it for the tests after it."""
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)
