"""Several real processes on this CPU, started as docs/large-galleries.md shows (torchrun over loopback): an index
folder and a Milvus collection built by two processes, each encoding its own share, equal bit for bit to one
process's build; the refusals when one process sees another model or gallery listing, fired in every process; a two-
process training run whose Sew loss takes the global batch, and that loss with its gradients against one process's;
and `accelerate launch --cpu --num_processes 2`, which starts one process, refused in one line naming the torchrun
command. Every launch checks how many processes ran. decd.processes' own rules are tested here too, without launching
anything."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from decd.cli import main
from decd.processes import ProcessCountError, check_process_count, launched_processes, runs_on_cpus
from decd.search import BuildInterrupted, GalleryIndex, MilvusGallery, SkippedImagesWarning
from decd.search.milvus.store import PATH_FIELD, VECTOR_FIELD
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import save_tiny_model
from .milvus_fixtures import collection_name, milvus_server  # noqa: F401
from .search_fixtures import REPO, _index_command, gallery_and_model  # noqa: F401

BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 300  # seconds for one launch, start to exit (a few on this machine; generous for a busy one)
# One line per process and build (decd.search.build / decd.search.milvus.build, shown by the CLI under several).
SHARE = re.compile(r"decd-search index: process (\d+) of (\d+) \(pid (\d+) on [^)]*\) (?:encoded|wrote) (\d+) of the "
                   r"(\d+) files(?: to write)?(?: \(listing positions (\d+) to (\d+)\))?")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(commands: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    """Run `commands` at once (e.g. one torchrun per machine); (exit status, stdout + stderr) of each. A launch that
    does not end within LAUNCH_TIMEOUT is killed with its processes (a session of its own) and fails the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)  # what the launchers set, and nothing from this test's own environment
    logs = [cwd / f"launch-{number}.log" for number in range(len(commands))]
    running = []
    for command, log in zip(commands, logs):
        with open(log, "w") as output:
            running.append(subprocess.Popen([str(part) for part in command], cwd=cwd, env=env, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for process in running:
            process.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        for process in running:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        pytest.fail(f"a launch ran past {LAUNCH_TIMEOUT} s: " + " | ".join(log.read_text()[-2000:] for log in logs))
    return [(process.returncode, log.read_text()) for process, log in zip(running, logs)]


def _torchrun(cwd: Path, program: list, processes: int = 2) -> tuple[int, str]:
    """`torchrun --nproc_per_node N --master_addr 127.0.0.1 --master_port P PROGRAM` (one machine)."""
    [result] = _run([[BIN / "torchrun", "--nproc_per_node", processes, "--master_addr", "127.0.0.1", "--master_port",
                      _free_port(), *program]], cwd)
    return result


def _machines(cwd: Path, programs: list[list]) -> list[tuple[int, str]]:
    """One torchrun per machine, as docs/large-galleries.md shows for several (here all on this one, over loopback):
    `torchrun --nnodes M --node_rank R --master_addr 127.0.0.1 --master_port P --nproc_per_node 1 PROGRAM_R`."""
    port = _free_port()
    return _run([[BIN / "torchrun", "--nnodes", len(programs), "--node_rank", rank, "--master_addr", "127.0.0.1",
                  "--master_port", port, "--nproc_per_node", 1, *program] for rank, program in enumerate(programs)],
                cwd)


def _shares(output: str, processes: int) -> dict[int, dict]:
    """{process: its line's numbers}; fails unless each of the `processes` processes reported its share once."""
    found = {}
    for match in SHARE.finditer(output):
        rank, world, pid, count, total, first, last = match.groups()
        assert int(world) == processes and int(rank) not in found, output[-3000:]
        found[int(rank)] = dict(pid=int(pid), count=int(count), total=int(total),
                                positions=range(int(first), int(last) + 1) if first is not None else range(0))
    assert sorted(found) == list(range(processes)), output[-3000:]
    assert len({share["pid"] for share in found.values()}) == processes, found  # as many processes as asked for
    return found


def _one_thread_build(model_dir: Path, gallery: Path, output: Path, **options) -> GalleryIndex:
    """One process, in this one, on one thread as each launched process is (OMP_NUM_THREADS=1)."""
    torch.set_num_threads(1)
    try:
        model, processor = DecdModel.from_pretrained(model_dir).eval(), DecdProcessor.from_pretrained(model_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedImagesWarning)  # the skipped files are compared below
            return GalleryIndex.build(model, processor, gallery, output, batch_size=3, show_progress=False,
                                      **options)
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def _same_index(first: Path, second: Path):
    assert (first / "embeddings.npy").read_bytes() == (second / "embeddings.npy").read_bytes()
    assert json.loads((first / "paths.json").read_text()) == json.loads((second / "paths.json").read_text())
    meta_one, meta_two = (json.loads((folder / "meta.json").read_text()) for folder in (first, second))
    for key in ("count", "embedding_dim", "embeddings_sha256", "model_checksum", "skipped", "num_skipped",
                "num_files", "backend", "format", "format_version"):
        assert meta_one[key] == meta_two[key], key
    assert sorted(path.name for path in second.iterdir()) == ["embeddings.npy", "files.json", "meta.json", "paths.json"]


@pytest.fixture(scope="module")
def two_bad_files(gallery_and_model, tmp_path_factory):
    """The search fixture's gallery (its bad.png comes first in the listing) with an unreadable file at the end too:
    one in each process's share of two."""
    root, shared, model_dir = gallery_and_model
    gallery = shutil.copytree(shared, tmp_path_factory.mktemp("two-bad") / "gallery")
    (gallery / "val" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    return Path(gallery), model_dir


# ---------------------------------------------------------------------------------------------
# An index folder
# ---------------------------------------------------------------------------------------------


def test_two_processes_encode_one_share_each_into_the_one_process_index_bit_for_bit(two_bad_files, tmp_path):
    gallery, model_dir = two_bad_files
    _one_thread_build(model_dir, gallery, tmp_path / "one")
    status, output = _torchrun(tmp_path, ["-m", "decd.cli", *_index_command(gallery, model_dir, tmp_path / "two")])
    assert status == 0, output[-3000:]
    shares = _shares(output, 2)
    files = len(json.loads((tmp_path / "one" / "meta.json").read_text())["skipped"]) + len(
        json.loads((tmp_path / "one" / "paths.json").read_text()))
    # Each process encoded its own contiguous share of whole batches of 3; together every file once.
    assert [share["total"] for share in shares.values()] == [files, files]
    assert list(shares[0]["positions"]) + list(shares[1]["positions"]) == list(range(files))
    assert shares[0]["count"] == len(shares[0]["positions"]) and shares[1]["count"] == len(shares[1]["positions"])
    assert len(shares[0]["positions"]) % 3 == 0 and shares[1]["count"] > 0
    _same_index(tmp_path / "one", tmp_path / "two")
    # Reported once, by the main process; the unreadable files of both shares (one each) are listed.
    assert output.count("Indexed ") == 1 and output.count("Skipped 2 unreadable") == 1, output[-3000:]
    assert output.count("  bad.png: ") == 1 and output.count("  val/zz_broken.png: ") == 1, output[-3000:]

    # Resumable across process counts: one process stops after 2 batches, two processes encode only the rest.
    with pytest.raises(BuildInterrupted):
        _one_thread_build(model_dir, gallery, tmp_path / "resumed", shard_batches=1, max_batches=2)
    written = [json.loads(path.read_text()) for path in (tmp_path / "resumed" / "partial").glob("shard_*.json")]
    assert sorted(shard["start"] for shard in written) == [0, 3]
    assert all(shard["writer"]["process"] == 0 and shard["writer"]["processes"] == 1 for shard in written)
    status, output = _torchrun(tmp_path, ["-m", "decd.cli", *_index_command(gallery, model_dir,
                                                                          tmp_path / "resumed")])
    assert status == 0, output[-3000:]
    shares = _shares(output, 2)
    assert list(shares[0]["positions"]) + list(shares[1]["positions"]) == list(range(6, files))
    _same_index(tmp_path / "one", tmp_path / "resumed")


def test_a_process_with_another_model_or_listing_stops_every_process_naming_itself(gallery_and_model, tmp_path):
    """Three machines (one process each); the second has another model, the third another listing (its copy of the
    gallery holds one more file). Each process stops before encoding, with the same kind of line."""
    _, gallery, model_dir = gallery_and_model
    other_model = save_tiny_model(tmp_path / "other-model", seed=1)
    other_listing = Path(shutil.copytree(gallery, tmp_path / "copy"))
    shutil.copy(other_listing / "bad.png", other_listing / "added.png")
    output = tmp_path / "index"
    programs = [["-m", "decd.cli", *_index_command(gallery, model_dir, output)],
                ["-m", "decd.cli", *_index_command(gallery, other_model, output)],
                ["-m", "decd.cli", *_index_command(other_listing, model_dir, output)]]
    results = _machines(tmp_path, programs)
    refusal = "sees another gallery listing, model or batch size than the main process; every process must see the " \
              "same folder and model"
    for machine, (status, log) in enumerate(results):
        assert status != 0, log[-3000:]
        # the main process reports the first process that stopped; each other process itself
        expected = f"decd-search index: error: process {machine or 1} of 3 {refusal}"
        assert log.count(expected) == 1, log[-3000:]
        assert "Connection closed by peer" not in log and "GalleryIndexError" not in log, log[-3000:]  # no crash
    assert not (output / "meta.json").exists()
    assert not list((output / "partial").glob("shard_*"))  # nothing was encoded


def test_accelerate_launch_cpu_with_two_processes_starts_one_and_is_refused_naming_torchrun(gallery_and_model,
                                                                                            tmp_path):
    _, gallery, model_dir = gallery_and_model
    command = _index_command(gallery, model_dir, tmp_path / "index")
    [(status, output)] = _run([[BIN / "accelerate", "launch", "--cpu", "--num_processes", 2, "--num_machines", 1,
                                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "decd.cli", *command]],
                              tmp_path)
    assert status != 0
    refusals = [line for line in output.splitlines() if line.startswith("decd-search index: error: ")]
    assert len(refusals) == 1, output[-3000:]  # one process ran, not the two asked for
    assert "`accelerate launch` was asked for several processes but started this one alone" in refusals[0]
    assert f"`torchrun --nproc_per_node N -m decd.cli index {gallery}" in refusals[0]
    assert not (tmp_path / "index").exists()


# ---------------------------------------------------------------------------------------------
# A Milvus collection (on a standalone server: Milvus Lite lets one process open a store)
# ---------------------------------------------------------------------------------------------


def test_two_processes_write_one_share_each_into_a_milvus_collection(two_bad_files, milvus_server, request,
                                                                     tmp_path):
    gallery, model_dir = two_bad_files
    reference = _one_thread_build(model_dir, gallery, tmp_path / "one")
    store = f"{milvus_server.uri}/{collection_name(request)}"
    command = ["index", gallery, "--model", model_dir, "--store", store, "--batch_size", 3, "--quiet"]
    status, output = _torchrun(tmp_path, ["-m", "decd.cli", *command])
    assert status == 0, output[-3000:]
    shares = _shares(output, 2)
    files = reference.meta["num_files"]
    assert list(shares[0]["positions"]) + list(shares[1]["positions"]) == list(range(files))
    # The main process reports the whole build: both shares' new rows and unreadable files.
    assert output.count(f"{len(reference)} images; {len(reference)} new, 0 changed") == 1, output[-3000:]
    assert output.count("Skipped 2 file(s)") == 1 and output.count("  val/zz_broken.png: ") == 1, output[-3000:]
    gallery_in_milvus = MilvusGallery.open(store)
    collection = gallery_in_milvus.collection
    rows = collection.client.query(collection.name, filter="id >= 0", limit=100,
                                   output_fields=[PATH_FIELD, VECTOR_FIELD])
    stored = {row[PATH_FIELD]: np.asarray(row[VECTOR_FIELD], dtype=np.float32) for row in rows}
    assert sorted(stored) == sorted(reference.paths)
    expected = np.asarray(reference.embeddings)
    assert all(np.array_equal(stored[path], expected[row]) for row, path in enumerate(reference.paths))

    # A machine with another model: both processes stop, naming it, before any row is written.
    other = save_tiny_model(tmp_path / "other-model", seed=1)
    fresh = f"{milvus_server.uri}/{collection_name(request)}_other"
    results = _machines(tmp_path, [["-m", "decd.cli", *command[:4], "--store", fresh, "--quiet"],
                                   ["-m", "decd.cli", "index", gallery, "--model", other, "--store", fresh, "--quiet"]])
    for status, log in results:
        assert status != 0
        assert log.count("decd-search index: error: process 1 of 2 finds collection ") == 1, log[-3000:]
        assert "prepared for another model; every process must use the same model" in log
    assert len(MilvusGallery.open(fresh)) == 0


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _train_command(tiny_set, output_dir):
    return [REPO / "examples" / "train.py", REPO / "recipes" / "synthetic.json", "--max_steps", 2, "--data_dir",
            tiny_set, "--output_dir", output_dir, "--per_device_train_batch_size", 4, "--eval_strategy", "steps",
            "--eval_steps", 2, "--save_strategy", "steps", "--save_steps", 2, "--logging_steps", 1,
            "--disable_tqdm", "true"]


def test_two_training_processes_share_the_data_and_the_sew_loss_takes_the_global_batch(tiny_set, tmp_path):
    status, output = _torchrun(tmp_path, _train_command(tiny_set, tmp_path / "run"))
    assert status == 0, output[-3000:]
    assert "Training on 2 processes (cpu): the Sew loss compares each pair with the global batch of 8 pairs" \
           in output, output[-3000:]
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    for name in ("test_R1", "test_R5", "test_R10", "test_mAP", "test_mINP"):
        assert 0 <= results[name] <= 100
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    steps = [entry for entry in state["log_history"] if "loss_sew" in entry]
    # 24 training pairs in global batches of 2 x 4: 3 steps per epoch (one process alone would take 6)
    assert [entry["epoch"] for entry in steps] == pytest.approx([1 / 3, 2 / 3])


GLOBAL_BATCH_PROGRAM = """
import sys, warnings
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from losses_decd import gather_with_grad, sew_loss

warnings.simplefilter("error", FutureWarning)  # no deprecated collective
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
generator = torch.Generator().manual_seed(0)  # the same global batch in every process
images, texts = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
ids, quality = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.rand(8, generator=generator)

def loss(images, texts, ids, quality):
    return sew_loss(gather_with_grad(images), gather_with_grad(texts), gather_with_grad(ids),
                    gather_with_grad(quality), margin=0.1, temperature=0.02)

full = [tensor.clone().requires_grad_() for tensor in (images, texts)]
expected = sew_loss(*full, ids, quality, margin=0.1, temperature=0.02)  # one process, the whole batch
expected.backward()
share = slice(rank * 8 // world, (rank + 1) * 8 // world)
for name, function in (("eager", loss), ("compiled", torch.compile(loss, backend="aot_eager"))):
    mine = [tensor[share].clone().requires_grad_() for tensor in (images, texts)]
    value = function(*mine, ids[share], quality[share])
    value.backward()
    # Each process's gradient for its share is the whole batch's, times the processes that computed the same loss
    # (DDP's average of the parameters' gradients then gives the one-process gradient).
    same = torch.allclose(value, expected, atol=1e-5) and all(
        torch.allclose(part.grad, world * whole.grad[share], atol=1e-5) for part, whole in zip(mine, full))
    print(f"rank {rank} of {world} {name}: loss {value.item():.6f} expected {expected.item():.6f} same {same}")
dist.destroy_process_group()
"""


def test_the_loss_over_the_global_batch_equals_one_processs_with_its_gradients_eager_and_compiled(tmp_path):
    program = tmp_path / "global_batch.py"
    program.write_text(GLOBAL_BATCH_PROGRAM)
    status, output = _torchrun(tmp_path, [program, REPO])
    assert status == 0, output[-3000:]
    pattern = r"rank (\d) of (\d) (eager|compiled): [^:]*? expected [-0-9.]+ same (True|False)"
    lines = sorted(re.findall(pattern, output))  # the processes' lines may interleave
    assert lines == [(rank, "2", mode, "True") for rank in "01" for mode in ("compiled", "eager")], output[-3000:]


def test_accelerate_launch_cpu_with_two_processes_refuses_to_train_alone(tiny_set, tmp_path):
    [(status, output)] = _run([[BIN / "accelerate", "launch", "--cpu", "--num_processes", 2, "--num_machines", 1,
                                "--mixed_precision", "no", "--dynamo_backend", "no",
                                *_train_command(tiny_set, tmp_path / "run")]], tmp_path)
    assert status != 0
    refusals = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 1, output[-3000:]  # one process ran, not the two asked for
    assert "started this one alone" in refusals[0] and "`torchrun --nproc_per_node N " in refusals[0]
    assert "examples/train.py" in refusals[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# decd.processes' rules, without a launch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                 "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_process_asked_to_be_one_of_several_that_runs_alone_is_refused(no_launcher):
    check_process_count(1, "-m decd.cli index G")  # no launcher: one process, as asked
    no_launcher.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4
    check_process_count(4, "-m decd.cli index G")
    with pytest.raises(ProcessCountError, match=r"the launcher started 4 processes, but this one runs as one of 1: .*"
                                                r"`torchrun --nproc_per_node N -m decd.cli index G`"):
        check_process_count(1, "-m decd.cli index G")
    no_launcher.setenv("WORLD_SIZE", "four")
    with pytest.raises(ProcessCountError, match="WORLD_SIZE='four' is not a number of processes"):
        launched_processes()
    no_launcher.delenv("WORLD_SIZE")
    # accelerate's simple launcher asked for several: ACCELERATE_USE_CPU and MASTER_ADDR, no rank
    no_launcher.setenv("ACCELERATE_USE_CPU", "False")
    check_process_count(1, "x.py")  # --num_processes 1 sets no MASTER_ADDR
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ProcessCountError, match="started this one alone"):
        check_process_count(1, "x.py")
    no_launcher.setenv("RANK", "0")  # a launcher that gives ranks (accelerate's GPU launcher is torchrun's)
    check_process_count(1, "x.py")


def test_processes_compute_on_cpus_when_told_or_without_an_accelerator(no_launcher):
    assert runs_on_cpus("cpu") and runs_on_cpus("cpu:0")
    no_launcher.setenv("ACCELERATE_USE_CPU", "true")
    assert runs_on_cpus("cuda")
    no_launcher.delenv("ACCELERATE_USE_CPU")
    # this machine: torch.distributed joins processes on CUDA (or XPU, NPU, ...) only where there is one
    assert runs_on_cpus() == (not torch.cuda.is_available())


def test_the_cli_refuses_a_launch_it_cannot_join_in_one_line(no_launcher, gallery_and_model, tmp_path, capsys):
    _, gallery, model_dir = gallery_and_model
    no_launcher.setenv("ACCELERATE_USE_CPU", "True")
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    assert main(_index_command(gallery, model_dir, tmp_path / "index")) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("decd-search index: error: `accelerate launch` was asked for several processes")
    assert "\n" not in error and not (tmp_path / "index").exists()
