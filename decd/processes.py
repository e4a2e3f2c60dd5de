"""The processes of one job: how many a launcher started, which one this is, and the check that they all run.

`process_state` is the one process state of `decd-search index` (an index folder or a Milvus collection), and
`examples/train.py` gets the same from `DecdTrainingArguments` (docs/large-galleries.md, "Many GPUs or machines"):

- `torchrun --nproc_per_node N` (CPUs or GPUs; `--nnodes`, `--node_rank`, `--master_addr` for several machines)
  and `accelerate launch` on GPUs start N processes, which find each other through what the launcher sets in
  their environment (WORLD_SIZE, RANK, MASTER_ADDR, ...).
- accelerate's `PartialState()` joins them only on an accelerator: on a machine without one (a CPU node) each
  process reports itself alone, process 0 of 1, and would do all the work. Processes that compute on CPUs
  therefore ask for accelerate's CPU state (gloo), as `TrainingArguments(use_cpu=True)` does.
- `accelerate launch --cpu --num_processes N` (accelerate's simple launcher, also used without --cpu on a machine
  with fewer than two GPUs) runs the command once, whatever N.

A process that was asked to be one of several and finds itself alone stops with `ProcessCountError`, naming the
command that starts the processes, rather than quietly doing the work of all of them.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

# Where launchers put the number of processes they started (torchrun and accelerate's GPU launcher: WORLD_SIZE;
# MPI: the others), in the order accelerate reads them.
WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
LAUNCH_DOCS = "docs/large-galleries.md"


class ProcessCountError(RuntimeError):
    """This process was asked to be one of several but runs alone (the message names the command that starts them)."""


def launched_processes() -> int:
    """How many processes the launcher says it started (WORLD_SIZE, ...); 1 without a launcher."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ProcessCountError(f"the environment variable {name}={value!r} is not a number of processes; "
                                        f"unset it or start the processes with torchrun ({LAUNCH_DOCS})") from None
    return 1


def runs_on_cpus(device: Optional[str] = None) -> bool:
    """Whether this job's processes compute on CPUs: `device` is the CPU, accelerate was told so (`accelerate
    launch --cpu`, ACCELERATE_USE_CPU), or this machine has no accelerator that torch.distributed joins processes
    on (CUDA, XPU, NPU, ...; a Mac's MPS has none)."""
    if device is not None and device.split(":")[0] == "cpu":
        return True
    if os.environ.get("ACCELERATE_USE_CPU", "false").strip().lower() in ("1", "true", "yes", "y", "on"):
        return True
    try:
        from accelerate.utils import get_distributed_backend, get_torch_accelerator_backend
    except ImportError:  # an accelerate without these helpers: CUDA is the accelerator it joins processes on
        return not torch.cuda.is_available()
    return get_distributed_backend(get_torch_accelerator_backend()[0]) is None


def process_state(command: str, device: Optional[str] = None):
    """This process's accelerate `PartialState` (process_index, num_processes, is_main_process, device,
    wait_for_everyone): the processes a launcher started, joined over gloo where they compute on CPUs, or this
    process alone. Checked by `check_process_count`; `command` is what the processes run, for its message."""
    from accelerate import PartialState

    state = PartialState(cpu=launched_processes() > 1 and runs_on_cpus(device))
    check_process_count(state.num_processes, command)
    return state


def check_process_count(running: int, command: str) -> None:
    """Raise `ProcessCountError` when this process was asked to be one of several but runs as one of `running`.

    Two cases: a launcher's count (WORLD_SIZE, ...) that the process state did not join, and `accelerate launch
    --num_processes N` whose simple launcher (--cpu, or a machine with fewer than two GPUs) started this process
    alone. Its environment tells it apart: ACCELERATE_USE_CPU (any value) and MASTER_ADDR, which it sets only when
    asked for several processes or machines, and no rank. `command` (e.g. "-m decd.cli index ...") is named in
    the message with the torchrun command that starts N processes of it.
    """
    asked = launched_processes()
    torchrun = f"torchrun --nproc_per_node N {command}"
    if asked > 1 and running != asked:
        raise ProcessCountError(
            f"the launcher started {asked} processes, but this one runs as one of {running}: it did not join the "
            f"others, and would do all the work itself. On CPUs start them with `{torchrun}` ({LAUNCH_DOCS})")
    rank_variables = ("RANK", "LOCAL_RANK", *WORLD_SIZE_VARIABLES)
    if running == 1 and "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ \
            and not any(name in os.environ for name in rank_variables):
        raise ProcessCountError(
            "`accelerate launch` was asked for several processes but started this one alone: on CPUs (--cpu, or "
            "fewer than two GPUs) its launcher runs the command once, and this process would do all the work. Start "
            f"N processes on each machine with `{torchrun}` ({LAUNCH_DOCS}), or drop --num_processes for one")


def all_processes(state, value: Any) -> list:
    """`value` from every process, in process order, in every process: one collective, so every process calls it at
    the same point. Without a process group (one process, or threads standing in for processes) it is [value]."""
    distributed = torch.distributed
    if state.num_processes > 1 and distributed.is_available() and distributed.is_initialized():
        values = [None] * distributed.get_world_size()
        distributed.all_gather_object(values, value)
        return values
    return [value]


def stop_together(state, problem: Optional[BaseException]) -> None:
    """A check every process makes at the same point: if any process found a `problem`, every process raises (its
    own, else the first other's), so that none goes on to wait at the next barrier for one that stopped. A
    problem's message names the process that found it when several run."""
    problems = all_processes(state, problem)
    first = problem if problem is not None else next((found for found in problems if found is not None), None)
    if first is not None:
        raise first


def end_processes() -> None:
    """Leave the process group, if this process joined one: its communication threads end here, not in the
    interpreter's exit (where a still-running one aborts the process, "terminate called without an active
    exception", after the work is done). Local: no other process is waited for."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


__all__ = ["LAUNCH_DOCS", "ProcessCountError", "all_processes", "check_process_count", "end_processes",
           "launched_processes", "process_state", "runs_on_cpus", "stop_together"]
