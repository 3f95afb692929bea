import os
import sys

# Tests import the package and their helpers from this checkout, installed or not.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several pytest-xdist workers share the cores: one thread each (and for the processes they
    # start), or their OpenMP threads spin-wait for cores the other workers are using.
    os.environ["OMP_NUM_THREADS"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _default_dtype_is_restored():
    """A test that changes torch's default dtype must not change it for the tests after it."""
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session", autouse=True)
def _worker_groups_end_with_the_session():
    """The gloo worker groups of distributed.run_distributed live for the whole session."""
    yield
    if "distributed" in sys.modules:
        sys.modules["distributed"].close_worker_groups()


# -- running on several pytest-xdist workers (`make test`: -n 2) -----------------------------
# Start-up dominates this suite (a trainer launch costs ~8 s whatever its step count) and the
# SLURM tests mostly wait, so two workers overlap the waiting with CPU-bound tests. Tests are
# handed out in groups (--dist loadgroup):
#   - every test marked `slurm` runs on one worker, one after another: their jobs share the one
#     local SLURM node (2 CPUs), and a job queued behind another's would miss its time limits;
#   - the tests of a module that share an expensive module-scoped fixture (a trainer run, a
#     subprocess of Triton checks), or run_distributed's worker groups, run on one worker, so
#     the fixture is computed once (one that only calls train_helpers.prepare_data is cheap:
#     the data is prepared once per process and copied);
#   - every other test on its own.
# Groups start most expensive first (GROUP_ORDER), so that no long one starts last.
GROUP_ORDER = ["slurm", "test_train_resume.py", "test_resume_layouts.py", "test_train_compile.py", "test_consolidate.py",
               "test_reshard.py", "test_train_modes.py", "test_metric_kernel.py", "test_context_parallel.py", "test_glu_kernel.py", "test_contiguous_grads.py",
               "test_pipeline_zero.py", "test_fp8.py", "test_eval_harness.py", "test_tensor_parallel.py", "test_launch.py",
               "test_demo.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits jobs to the local SLURM cluster (one such test at a time)")
    if not hasattr(config, "workerinput") and getattr(config.option, "dist", "no") in ("load", "loadgroup"):
        # -n N alone means --dist load; the groups below need loadgroup
        config.option.dist = "loadgroup"
        config.option.loadscopereorder = False            # keep GROUP_ORDER


def _expensive(fixturedef) -> bool:
    """False for a fixture whose body is just `return prepare_data(...)`."""
    import ast
    import inspect
    import textwrap
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(fixturedef.func))).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return True
    body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]  # docstring
    call = body[0].value if len(body) == 1 and isinstance(body[0], ast.Return) else None
    return not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "prepare_data")


def _group(item) -> str:
    module = os.path.basename(str(item.fspath))
    if item.get_closest_marker("slurm"):
        return "slurm"
    if "run_distributed" in vars(item.module):
        return module
    for name in item.fixturenames:
        defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
        if any(d.scope in ("module", "class", "package") and d.baseid.split("::")[0].endswith(module)
               and _expensive(d) for d in defs):
            return module
    return ""


def _set_nodeid(item, nodeid: str) -> None:
    """LoadGroupScheduling puts the tests whose id ends in the same `@group` on one worker."""
    if hasattr(item, "_id"):                        # pytest >= 9: a structured id
        from _pytest.nodeid import NodeId
        item._id = NodeId.parse(nodeid)
    else:
        item._nodeid = nodeid


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):   # not a pytest-xdist worker: nothing to schedule
        return
    for item in items:
        group = _group(item)
        if group:   # what xdist_group marks do; pytest-xdist 3.8 cannot rename a test under pytest 9's node ids
            _set_nodeid(item, f"{item.nodeid}@{group}")

    def rank(item):
        group = _group(item) or os.path.basename(str(item.fspath))
        return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)
    items.sort(key=rank)   # stable: collection order within a rank
