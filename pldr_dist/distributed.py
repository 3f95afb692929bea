"""Who am I in the job? Rank discovery and process-group start-up, for every launcher, in one place.

`discover()` reads the environment a launcher leaves behind, in this order:
  1. torchrun / the deepspeed launcher / any env:// launcher: RANK, WORLD_SIZE, LOCAL_RANK,
     MASTER_ADDR, MASTER_PORT.
  2. mpirun (Open MPI's OMPI_COMM_WORLD_* or an MPICH-style PMI_RANK/PMI_SIZE): ranks from mpi4py,
     address and port chosen by rank 0 and broadcast. This comes before SLURM because mpirun
     inside an sbatch script inherits the batch step's SLURM_PROCID=0, which is not its rank.
  3. SLURM under srun (SLURM_STEP_ID is set only inside a job step): SLURM_PROCID, SLURM_LOCALID,
     the step's task counts, master = first host of the step's nodelist, port from the job id.
  4. Nothing: a world of one process.
`init_distributed()` exports what was found as the env:// variables torch and DeepSpeed read,
then starts DeepSpeed's comm layer with DeepSpeed's own MPI discovery switched off, so that
exactly one piece of code decides ranks.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

from .errors import PLDRError

PREEMPTED_EXIT_CODE = 75   # "checkpointed for preemption": launch/slurm_train.sbatch requeues the job on it


class LaunchError(PLDRError, RuntimeError):
    """The launcher's environment is wrong or incomplete; the message says what to set."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str   # torchrun | deepspeed | env | mpi | slurm | single

    def as_env(self) -> dict:
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def _int_var(name: str, source: str) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        raise LaunchError(f"{source}: {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{source}: {name}={value!r} is not an integer") from None


def _checked(env: DistEnv) -> DistEnv:
    where = f"{env.launcher} environment"
    if env.world_size < 1:
        raise LaunchError(f"{where}: world size {env.world_size} must be at least 1")
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"{where}: rank {env.rank} is outside world size {env.world_size} (ranks are 0..{env.world_size - 1})")
    if not 0 <= env.local_rank < env.local_world_size:
        raise LaunchError(f"{where}: local rank {env.local_rank} is outside the {env.local_world_size} local processes")
    if not 0 < env.master_port < 65536:
        raise LaunchError(f"{where}: MASTER_PORT={env.master_port} is not a TCP port (1..65535)")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- SLURM ---------------------------------------------------------------------------------
def parse_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: `node[01-03,7],gpu5` -> node01 node02 node03 node7 gpu5
    (and `x[1-2]y[3-4]` -> x1y3 x1y4 x2y3 x2y4): the pure-Python twin of `scontrol show hostnames`."""
    hosts = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        hosts += _expand_name(name)
    return hosts


def _expand_name(name: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if not m:
        return [name]
    prefix, ranges, suffix = m.groups()
    values = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
    return [prefix + v + rest for v in values for rest in _expand_name(suffix)]


def expand_nodelist(nodelist: str) -> list[str]:
    """`scontrol show hostnames` where SLURM is configured (it knows every form), else the parser above.
    (Without a slurm.conf, scontrol retries for a minute before failing, hence the check.)"""
    configured = os.path.exists(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if configured and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return parse_nodelist(nodelist)


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"SLURM environment: cannot read tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_port(job_id: int) -> int:
    """Every task of a job derives the same port, and concurrent jobs on a node rarely collide."""
    return 10000 + job_id % 50000


def _from_slurm() -> DistEnv:
    src = "SLURM environment (srun)"
    rank = _int_var("SLURM_PROCID", src)
    world = int(os.environ.get("SLURM_STEP_NUM_TASKS") or _int_var("SLURM_NTASKS", src))
    local_rank = _int_var("SLURM_LOCALID", src)
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = parse_tasks_per_node(per_node)
        node = int(os.environ.get("SLURM_NODEID", "0"))
        local_world = counts[node] if node < len(counts) else counts[-1]
    else:
        local_world = _int_var("SLURM_NTASKS_PER_NODE", src)
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if os.environ.get("MASTER_ADDR"):
        addr = os.environ["MASTER_ADDR"]
    elif nodelist:
        addr = expand_nodelist(nodelist)[0]
    else:
        raise LaunchError(f"{src}: SLURM_JOB_NODELIST is not set, so the master node is unknown (or set MASTER_ADDR)")
    port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else slurm_port(_int_var("SLURM_JOB_ID", src))
    return DistEnv(rank, local_rank, world, local_world, addr, port, "slurm")


# -- MPI -----------------------------------------------------------------------------------
def _from_mpi() -> DistEnv:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    host = MPI.Get_processor_name()
    if os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK"):
        local_rank = int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        local_world = int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    else:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_world = local.Get_rank(), local.Get_size()
        local.Free()
    hosts = comm.allgather(host)
    chosen = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else socket.gethostname())
        port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else free_port()
        chosen = (addr, port)
    addr, port = comm.bcast(chosen, root=0)
    return DistEnv(rank, local_rank, world, local_world, addr, port, "mpi")


# -- env:// launchers ----------------------------------------------------------------------
def _from_env() -> DistEnv:
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        launcher = "torchrun"
    elif os.environ.get("CROSS_SIZE") or os.environ.get("LOCAL_SIZE"):
        launcher = "deepspeed"
    else:
        launcher = "env"
    src = f"{launcher} environment"
    for have, lacking in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if not os.environ.get(lacking):
            raise LaunchError(f"{src}: {have} is set but {lacking} is not (set RANK, WORLD_SIZE, LOCAL_RANK, "
                              f"MASTER_ADDR and MASTER_PORT together, or start the job with a launcher)")
    rank, world = _int_var("RANK", src), _int_var("WORLD_SIZE", src)
    local_rank = _int_var("LOCAL_RANK", src) if world > 1 or os.environ.get("LOCAL_RANK") else rank
    local_world = next((_int_var(v, src) for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if os.environ.get(v)), world)
    if world > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise LaunchError(f"{src}: {' and '.join(missing)} not set for a {world}-process job "
                              f"(every rank needs the address and port of rank 0)")
    addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = _int_var("MASTER_PORT", src) if os.environ.get("MASTER_PORT") else free_port()
    return DistEnv(rank, local_rank, world, local_world, addr, port, launcher)


def _under_mpirun() -> bool:
    return bool(os.environ.get("OMPI_COMM_WORLD_SIZE") or (os.environ.get("PMI_SIZE") and os.environ.get("PMI_RANK")))


def discover() -> DistEnv:
    """This process's place in the job, from whichever launcher started it (see module docstring)."""
    if os.environ.get("RANK") or os.environ.get("WORLD_SIZE"):
        return _checked(_from_env())
    if _under_mpirun():
        return _checked(_from_mpi())
    if os.environ.get("SLURM_STEP_ID") and os.environ.get("SLURM_PROCID"):
        return _checked(_from_slurm())
    ntasks = int(os.environ.get("SLURM_NTASKS") or 1)
    if os.environ.get("SLURM_JOB_ID") and ntasks > 1:
        raise LaunchError(f"SLURM environment: this job has SLURM_NTASKS={ntasks} but this process was not started "
                          f"by srun (SLURM_STEP_ID is unset): launch it with `srun python -m ...`")
    return DistEnv(0, 0, 1, 1, "127.0.0.1", free_port(), "single")


# -- start-up and shutdown ------------------------------------------------------------------
def init_distributed(backend: str | None = None) -> DistEnv:
    """Discover, export RANK/WORLD_SIZE/..., pick nccl (GPU) or gloo (CPU), pin the GPU of this
    local rank, cap CPU threads per process, and start DeepSpeed's comm layer (which owns
    torch.distributed's default process group)."""
    env = discover()
    os.environ.update(env.as_env())
    import torch
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    if backend is None:
        backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        # Without a cap every process starts one thread per core and they thrash each other.
        threads = int(os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // env.local_world_size))))
        torch.set_num_threads(threads)
    skip_shm_allreduce()
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return env


def skip_shm_allreduce() -> None:
    """DeepSpeed's comm layer, on CPU, builds and loads its shared-memory all-reduce op at every
    process-group start: a C++ compile of about a minute the first time on a 2-core machine, and a
    load in each process after that. Only `inference_all_reduce` (DeepSpeed's AutoTP inference) uses
    it; training never does, so it is marked unavailable here, as it is on platforms without it."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def barrier_and_destroy() -> None:
    """Every rank leaves together and tears its process group down; a rank exiting with the group
    alive makes gloo/nccl abort the interpreter (SIGABRT) in a fraction of runs."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
