"""Saved CPU kernel choices: a tuning file, so that a process skips the per-shape timing.

The extension's CPU path times its candidate kernels on the first call of each conv shape and keeps
the fastest for the process (resnet50 on 2 cores: its first forward takes about 1 s at batch 1 and
5 s at batch 8, against 47 and 300 ms after). A server sees that as a latency spike on the first
request of every new batch size, and two processes can pick differently where candidates are
close. :func:`save_tuning` writes the choices this process made to a JSON file; :func:`load_tuning`
gives them to another process, whose first calls then run the chosen kernels at once::

    fast = resnet_fused.fuse(model)
    with torch.inference_mode():
        for batch in (1, 8):
            fast(images[:batch])              # times each conv shape once
    resnet_fused.save_tuning("tuning.json")

    # later, in the serving process, before its first call:
    resnet_fused.load_tuning("tuning.json")

``resnet-fused tune`` does the first part from the command line and ``resnet-fused bench --tuning``
the second. A choice is keyed by the conv's shape, dtype, thread count and the
``RESNET_FUSED_*`` switches in force, so a call the file does not cover (another batch size, thread
count or switch) is timed as before, and a loaded choice this call cannot run (a file from a CPU with
other instructions, or from another version) is dropped and timed. Choices change which kernel runs,
never the result beyond the dtype's rounding.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import torch

from . import __version__
from .backends import extension
from .bench import cpu_flags, cpu_name

__all__ = ["save_tuning", "load_tuning", "clear_tuning", "tuning_choices", "TuningFileError", "FORMAT", "VERSION"]

FORMAT = "resnet-fused-cpu-tuning"
VERSION = 1
# Key fields renamed since version 1 files were first written, old name -> new (the values mean the
# same: isa_capped_at_avx2's 0 and 1 are isa_cap's "none" and "avx2"; isa_cap 2 is "avx512").
_RENAMED_FIELDS = {"isa_capped_at_avx2": "isa_cap"}


class TuningFileError(ValueError):
    """A tuning file that cannot be loaded: not JSON, another format or version, missing or bad fields."""


def _ops():
    reason = extension.load_error()
    if reason is not None:
        raise RuntimeError(f"tuning files need the extension backend's library: {reason}")
    return torch.ops.resnet_fused


def tuning_choices() -> list[dict]:
    """This process's CPU conv choices, one dict per conv shape: the key's fields (shape, dtype as a
    c10 ScalarType number, threads, the switches in force) and the choice's (``kernel``, ``block``,
    ``brgemm``, ``split_channels``), named as the extension names them, and ``description``, the
    line :func:`resnet_fused.backends.extension.cpu_conv_choices` shows for it."""
    ops = _ops()
    fields = list(ops.cpu_conv_choice_fields())
    while True:
        table = list(ops.cpu_conv_choice_table())
        lines = list(ops.cpu_conv_choices())  # in the table's order: both sorted by key
        if len(table) == len(lines) * len(fields):
            break  # else a shape was timed between the two reads (in another thread): read again
    rows = [table[i:i + len(fields)] for i in range(0, len(table), len(fields))]
    return [{"description": line, **dict(zip(fields, row))} for line, row in zip(lines, rows)]


def _machine() -> dict:
    return {"cpu": cpu_name(threads=False), "cpu_flags": cpu_flags(), "torch": torch.__version__,
            "resnet_fused": __version__}


def save_tuning(path: str | os.PathLike) -> int:
    """Write this process's CPU conv choices to ``path`` (JSON, with the CPU, its instruction sets
    and the versions they were made with); returns how many were written."""
    choices = tuning_choices()
    record = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": _machine(), "choices": choices}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return len(choices)


def load_tuning(path: str | os.PathLike, *, replace: bool = False) -> int:
    """Hand the choices saved in ``path`` to the extension's CPU path; returns how many were loaded.

    They join (and override, shape by shape) the choices this process has made; ``replace=True``
    forgets those first. A file made on another CPU, with other instruction sets, or with another
    torch or resnet-fused version is loaded with a warning saying what differs: its choices still
    compute the right result (a kernel this CPU cannot run is dropped and timed), but may not be
    the fastest here. Raises :class:`TuningFileError` for a file that is not a tuning file, and
    ``FileNotFoundError`` for a missing one.
    """
    ops = _ops()
    with open(path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as exc:
            raise TuningFileError(f"{path} is not a tuning file: not JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise TuningFileError(f"{path} is not a tuning file (no \"format\": \"{FORMAT}\")")
    if record.get("version") != VERSION:
        raise TuningFileError(f"{path} is a version {record.get('version')!r} tuning file; this resnet-fused "
                              f"{__version__} reads version {VERSION}: make it again with resnet-fused tune")
    choices = record.get("choices")
    if not isinstance(choices, list):
        raise TuningFileError(f"{path}: \"choices\" must be a list")
    fields = list(ops.cpu_conv_choice_fields())
    table = []
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise TuningFileError(f"{path}: choice {i} is not an object")
        choice = {_RENAMED_FIELDS.get(name, name): value for name, value in choice.items()}
        missing = [name for name in fields if name not in choice]
        if missing:
            raise TuningFileError(f"{path}: choice {i} has no {', '.join(missing)}")
        for name in fields:
            value = choice[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TuningFileError(f"{path}: choice {i}: {name} must be an integer, got {value!r}")
            table.append(value)
    machine = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    differences = [f"{key} {machine.get(key)!r} (here {value!r})" for key, value in _machine().items()
                   if machine.get(key) != value]
    if differences:
        warnings.warn(f"{path} was made with another {', '.join(differences)}: its choices are loaded, but may "
                      "not be the fastest here (resnet-fused tune makes a file for this machine)", stacklevel=2)
    try:
        count = ops.cpu_conv_load_choices(table, replace)  # checks every value before loading any
    except RuntimeError as exc:
        raise TuningFileError(f"{path}: {str(exc).splitlines()[0]}") from None
    threads = sorted({choice["threads"] for choice in choices})
    if threads and torch.get_num_threads() not in threads:
        # A choice is per thread count: none of these will be used, every shape is timed again.
        warnings.warn(f"{path} holds choices for {', '.join(map(str, threads))} thread(s) and this process runs "
                      f"{torch.get_num_threads()} (torch.get_num_threads()): none of them applies; make the file with "
                      "the thread count the model will run with (OMP_NUM_THREADS=N resnet-fused tune ...)", stacklevel=2)
    return count


def clear_tuning() -> None:
    """Forget every CPU conv choice of this process: the next call of each shape is timed again."""
    _ops().cpu_conv_clear_choices()
