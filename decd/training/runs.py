"""A training run's folder: what it holds, so that no run destroys another and no checkpoint is half there.

- `prepare_output_dir` refuses an output folder that holds another run (its model, results or checkpoints)
  unless the run resumes from a checkpoint, or `overwrite` is asked for: then the earlier run's files are
  removed first (listed in the log), so nothing left in the folder describes a model that is gone.
- `DecdTrainer` writes `checkpoint.json` into each checkpoint after everything else (`write_manifest`): the
  files and their sizes. `check_checkpoint` reads it back before a resume and names a missing or truncated
  file and the last complete checkpoint; a checkpoint without the manifest is incomplete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# What examples/train.py, the Trainer and examples/evaluate.py write into an output folder (besides checkpoints).
_RUN_FILES = re.compile(
    r"(config|generation_config|processor_config|preprocessor_config|special_tokens_map|tokenizer|tokenizer_config|"
    r"vocab|all_results|train_results|test_results|eval_results|trainer_state)\.json|merges\.txt|"
    r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|training_args\.bin|training_curves\.png|\w+_decd\.py|"
    r"checkpoint-\d+|eval-.+|runs")
# Files that make a folder "another run": a model, results or checkpoints.
_RUN_MARKERS = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors|all_results\.json|trainer_state\.json|"
                          r"checkpoint-\d+")


class RunFolderError(ValueError):
    """An output folder or a checkpoint that would lose or mislead (the message says which files and what to do)."""


def run_files(folder: str | os.PathLike) -> list[str]:
    """Names of the entries of `folder` that a training run wrote (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if _RUN_FILES.fullmatch(entry.name))


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse (RunFolderError) an output folder that holds another run, unless `resume` (the run continues) or
    `overwrite` (the earlier run's files are deleted now, each named in the log). Other files are left alone."""
    folder = Path(output_dir)
    found = run_files(folder)
    if resume or not any(_RUN_MARKERS.fullmatch(name) for name in found):
        return
    if not overwrite:
        shown = ", ".join(found[:12]) + (f" and {len(found) - 12} more" if len(found) > 12 else "")
        raise RunFolderError(
            f"output folder {folder} holds another run; training here would delete or overwrite {shown}. Pass "
            "another --output_dir, --resume_from_checkpoint to continue that run, or --overwrite_output_dir true "
            "to delete it first")
    for name in found:
        path = folder / name
        logger.warning("--overwrite_output_dir: deleting %s (the earlier run's)", path)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def write_manifest(checkpoint: str | os.PathLike) -> None:
    """Record every file of a written checkpoint and its size, last: the proof that the checkpoint is complete."""
    checkpoint = Path(checkpoint)
    files = {str(path.relative_to(checkpoint)): path.stat().st_size for path in sorted(checkpoint.rglob("*"))
             if path.is_file() and path.name != MANIFEST}
    temporary = checkpoint / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps({"files": files}, indent=1))
    os.replace(temporary, checkpoint / MANIFEST)


def _problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not a complete checkpoint, or None."""
    if not checkpoint.is_dir():
        return "it does not exist"
    try:
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST}, which is written last: the run stopped while saving it"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is damaged ({error})"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, not the {size:,} written (truncated or replaced)"
    return None


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `folder`, oldest step first."""
    found = [(int(match.group(1)), path) for path in Path(folder).glob("checkpoint-*")
             if (match := _CHECKPOINT.fullmatch(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found) if _problem(path) is None]


def check_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Raise RunFolderError naming what is wrong with `checkpoint` and the last complete one beside it."""
    checkpoint = Path(checkpoint)
    problem = _problem(checkpoint)
    if problem is None:
        return
    earlier = complete_checkpoints(checkpoint.parent)
    advice = (f"the last complete checkpoint there is {earlier[-1]}: resume from it with --resume_from_checkpoint "
              f"{earlier[-1]}" if earlier else f"no complete checkpoint is left in {checkpoint.parent}")
    raise RunFolderError(f"cannot resume from {checkpoint}: {problem}; {advice}")


def resolve_resume(resume_from_checkpoint, output_dir) -> str | None:
    """The checkpoint a run resumes from: a path as given, or for "true" the newest in `output_dir` (as the
    Trainer picks it); checked complete (RunFolderError otherwise). None: no resume."""
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "true", "True"):
        found = [(int(match.group(1)), path) for path in Path(output_dir).glob("checkpoint-*")
                 if (match := _CHECKPOINT.fullmatch(path.name))]
        if not found:
            raise RunFolderError(f"--resume_from_checkpoint true, but {output_dir} holds no checkpoint")
        resume_from_checkpoint = max(found)[1]
    check_checkpoint(resume_from_checkpoint)
    return str(resume_from_checkpoint)


__all__ = ["MANIFEST", "RunFolderError", "check_checkpoint", "complete_checkpoints", "prepare_output_dir",
           "resolve_resume", "run_files", "write_manifest"]
