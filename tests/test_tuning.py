"""Tuning files (resnet_fused/tuning.py): the CPU path's per-shape kernel choices saved, loaded back
in place of the timing, checked against what a call can run, and the ``resnet-fused tune`` command."""

from __future__ import annotations

import json
import platform

import pytest
import torch

import resnet_fused
from resnet_fused import cli, tuning
from resnet_fused.backends import extension
from resnet_fused.bench import cpu_flags
from test_avx2_conv import conv, make_case, reference
from utils import assert_close

pytestmark = [
    pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="our CPU kernels are x86-64 only"),
]

# csrc/cpu/ops_cpu.cpp's enum Kernel, whose values tuning files hold.
DIRECT, WINOGRAD_F4X4, IMPLICIT_GEMM = 0, 2, 3


@pytest.fixture(autouse=True)
def timed_unforced(monkeypatch):
    """Every switch at its default: the choices are timed (and keyed) as in a user's process."""
    for name in (extension.AVX2_CONV_ENV, extension.WINOGRAD_TILE_ENV, extension.GEMM_CORE_ENV,
                 extension.THREAD_SPLIT_ENV, extension.CPU_ISA_ENV):
        monkeypatch.delenv(name, raising=False)


def lines_for(prefix: str) -> list[str]:
    return [line for line in extension.cpu_conv_choices() if line.startswith(prefix)]


def timed_entry(case, prefix: str, path) -> tuple[dict, dict]:
    """The saved file's record after `case` was timed, and its entry for the shape."""
    assert_close(conv(*case), reference(*case))
    resnet_fused.save_tuning(path)
    record = json.loads(path.read_text())
    (entry,) = [c for c in record["choices"] if c["description"].startswith(prefix)]
    return record, entry


def ran(call) -> set[str]:
    """The profiler events of one call: our kernels are scopes named after them, oneDNN's conv has
    "convolution" in its name, so a call that timed its candidates shows both."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    return {e.name for e in prof.events()}


def test_saved_choices_load_back(tmp_path):
    case = make_case((1, 40, 32, 6, 7), (True, True, True), "channels_last")
    prefix = "x 1x40x6x7, weight 32x40x3x3, stride 1, padding 1, residual, Float,"
    path = tmp_path / "tuning.json"
    record, entry = timed_entry(case, prefix, path)
    assert record["format"] == tuning.FORMAT and record["version"] == tuning.VERSION
    assert record["machine"]["cpu_flags"] == cpu_flags() and record["machine"]["torch"] == torch.__version__
    assert [c["description"] for c in record["choices"]] == extension.cpu_conv_choices()
    assert (entry["batch"], entry["in_channels"], entry["height"], entry["width"], entry["out_channels"],
            entry["kernel_h"], entry["kernel_w"], entry["padding_h"], entry["residual"], entry["dtype"],
            entry["threads"]) == (1, 40, 6, 7, 32, 3, 3, 1, 1, 6, torch.get_num_threads())  # 6: c10's Float
    resnet_fused.clear_tuning()
    assert extension.cpu_conv_choices() == []
    assert resnet_fused.load_tuning(path) == len(record["choices"])
    assert extension.cpu_conv_choices() == [c["description"] for c in record["choices"]]
    assert_close(conv(*case), reference(*case))
    assert lines_for(prefix) == [entry["description"]]


def test_a_file_with_the_old_isa_field_name_loads(tmp_path):
    """Files written before the ISA switch took "avx512" name its key field isa_capped_at_avx2
    (0 or 1, the same values): they load as they did."""
    case = make_case((1, 44, 32, 5, 6), (True, False, True), "channels_last", kernel=1)
    prefix = "x 1x44x5x6, weight 32x44x1x1, stride 1, padding 0, Float,"
    path = tmp_path / "tuning.json"
    record, entry = timed_entry(case, prefix, path)
    for choice in record["choices"]:
        choice["isa_capped_at_avx2"] = choice.pop("isa_cap")
    path.write_text(json.dumps(record))
    assert resnet_fused.load_tuning(path, replace=True) == len(record["choices"])
    assert lines_for(prefix) == [entry["description"]]


@pytest.mark.parametrize("kernel, block, line_end", [(DIRECT, 0, ": direct"), (IMPLICIT_GEMM, 12, ": implicit_gemm block 12")])
def test_a_loaded_choice_runs_without_timing(kernel, block, line_end, tmp_path):
    """The first call after loading runs the loaded kernel only: no other candidate is timed."""
    channels = 72 + kernel  # a shape of its own per case
    case = make_case((1, channels, 32, 5, 6), (True, False, True), "channels_last", kernel=1)
    prefix = f"x 1x{channels}x5x6, weight 32x{channels}x1x1, stride 1, padding 0, Float,"
    path = tmp_path / "tuning.json"
    record, entry = timed_entry(case, prefix, path)
    entry.update(kernel=kernel, block=block, brgemm=0, split_channels=0)
    path.write_text(json.dumps(record))
    resnet_fused.load_tuning(path, replace=True)
    out = []
    names = ran(lambda: out.append(conv(*case)))
    assert_close(out[0], reference(*case))
    own, direct = "implicit_gemm" in names, any("convolution" in name for name in names)
    assert (own, direct) == ((False, True) if kernel == DIRECT else (True, False)), names
    assert lines_for(prefix)[0].endswith(line_end), lines_for(prefix)


@pytest.mark.parametrize("change, not_in_line", [
    ({"kernel": WINOGRAD_F4X4, "block": 48}, "winograd"),  # Winograd on a 1x1 conv
    ({"kernel": IMPLICIT_GEMM, "block": 48, "split_channels": 1}, "split channels"),  # 3 panels of 16 for 2 threads
])
def test_a_loaded_choice_the_call_cannot_run_is_timed_instead(change, not_in_line, tmp_path):
    channels = 80 + len(not_in_line)
    case = make_case((1, channels, 48, 5, 6), (True, True, True), "channels_last", kernel=1)
    prefix = f"x 1x{channels}x5x6, weight 48x{channels}x1x1, stride 1, padding 0, residual, Float,"
    path = tmp_path / "tuning.json"
    record, entry = timed_entry(case, prefix, path)
    entry.update(change)
    path.write_text(json.dumps(record))
    resnet_fused.load_tuning(path)
    assert_close(conv(*case), reference(*case))
    (line,) = lines_for(prefix)
    assert not_in_line not in line, line


def _set(name, value, index=0):
    def change(record):
        record["choices"][index][name] = value
        return json.dumps(record)
    return change


def _drop(name):
    def change(record):
        del record["choices"][0][name]
        return json.dumps(record)
    return change


BAD_FILES = {
    "not_json": (lambda record: "{", "is not a tuning file: not JSON"),
    "format": (lambda record: json.dumps({**record, "format": "onnx"}), 'is not a tuning file (no "format"'),
    "version": (lambda record: json.dumps({**record, "version": 2}), "is a version 2 tuning file"),
    "choices": (lambda record: json.dumps({**record, "choices": {}}), '"choices" must be a list'),
    "missing_field": (_drop("block"), "choice 0 has no block"),
    "text_value": (_set("block", "48"), "choice 0: block must be an integer, got '48'"),
    "bool_value": (_set("residual", True), "choice 0: residual must be an integer, got True"),
    "unknown_kernel": (_set("kernel", 99), "conv choice 0: kernel must be in [0, 6], got 99"),
    "negative_size": (_set("height", -1), "conv choice 0: height must be in [1, "),
    "float64": (_set("dtype", 7), "conv choice 0: dtype must be Float, BFloat16 or Half"),
    "last_row_bad": (_set("stride_h", 0, index=-1), "stride_h must be in [1, "),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_file_is_refused_and_loads_nothing(name, tmp_path):
    mutate, message = BAD_FILES[name]
    case = make_case((1, 24, 16, 4, 5), (True, False, True), "channels_last", kernel=1)
    path = tmp_path / "tuning.json"
    record, _ = timed_entry(case, "x 1x24x4x5, weight 16x24x1x1,", path)
    for entry in record["choices"]:
        entry.update(kernel=DIRECT, block=0)  # would change choices, were anything loaded
    path.write_text(mutate(record))
    before = extension.cpu_conv_choices()
    with pytest.raises(tuning.TuningFileError, match=None) as info:
        resnet_fused.load_tuning(path, replace=True)
    assert message in str(info.value) and str(path) in str(info.value), str(info.value)
    assert extension.cpu_conv_choices() == before


def test_a_file_from_another_machine_loads_with_a_warning(tmp_path):
    case = make_case((1, 24, 16, 4, 6), (True, False, True), "channels_last", kernel=1)
    path = tmp_path / "tuning.json"
    record, _ = timed_entry(case, "x 1x24x4x6, weight 16x24x1x1,", path)
    record["machine"]["cpu"] = "Another CPU"
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="was made with another cpu 'Another CPU'"):
        assert resnet_fused.load_tuning(path) == len(record["choices"])


def test_a_file_for_another_thread_count_says_none_applies(tmp_path):
    case = make_case((1, 24, 16, 4, 9), (True, False, True), "channels_last", kernel=1)
    path = tmp_path / "tuning.json"
    record, _ = timed_entry(case, "x 1x24x4x9, weight 16x24x1x1,", path)
    for entry in record["choices"]:
        entry["threads"] = torch.get_num_threads() + 1
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=f"this process runs {torch.get_num_threads()} .*none of them applies"):
        resnet_fused.load_tuning(path)


def test_replace_forgets_the_choices_made(tmp_path):
    path = tmp_path / "tuning.json"
    timed_entry(make_case((1, 24, 16, 4, 7), (True, False, True), "channels_last", kernel=1), "x 1x24x4x7,", path)
    assert_close(conv(*make_case((1, 24, 16, 4, 8), (True, False, True), "channels_last", kernel=1)),
                 reference(*make_case((1, 24, 16, 4, 8), (True, False, True), "channels_last", kernel=1)))
    assert lines_for("x 1x24x4x8,")
    resnet_fused.load_tuning(path)
    assert lines_for("x 1x24x4x8,") and lines_for("x 1x24x4x7,")
    resnet_fused.load_tuning(path, replace=True)
    assert not lines_for("x 1x24x4x8,") and lines_for("x 1x24x4x7,")


def test_the_library_op_checks_the_table():
    width = len(torch.ops.resnet_fused.cpu_conv_choice_fields())
    with pytest.raises(RuntimeError, match=f"rows of {width} values"):
        torch.ops.resnet_fused.cpu_conv_load_choices([1, 2, 3], False)


def test_without_the_library_tuning_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "load_error", lambda: "resnet_fused._C is not built")
    with pytest.raises(RuntimeError, match="tuning files need the extension backend's library: resnet_fused._C is not built"):
        resnet_fused.save_tuning(tmp_path / "tuning.json")


def _table_rows(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| resnet18")]


def test_tune_command_writes_a_file_that_bench_loads(tmp_path, capsys):
    path = tmp_path / "tuning.json"
    argv = ["tune", "--model", "resnet18", "--batch", "1", "2", "--size", "32", "--out", str(path), "--no-progress"]
    assert cli.main(argv) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [row[:3] for row in rows] == [["resnet18", "fp32", "1"], ["resnet18", "fp32", "2"]]
    record = json.loads(path.read_text())
    for batch in (1, 2):  # the stem's choice, for each batch size
        assert any(c["description"].startswith(f"x {batch}x3x32x32, weight 64x3x7x7,") for c in record["choices"])
    # Run again on the same file: its choices are kept, nothing is left to time.
    assert cli.main(argv) == 0
    assert [row[3] for row in _table_rows(capsys.readouterr().out)] == ["0", "0"]
    argv = ["bench", "--model", "resnet18", "--size", "32", "--repeat", "1", "--warmup", "0", "--backend", "extension",
            "--tuning", str(path)]
    assert cli.main(argv) == 0
    assert f"loaded {len(record['choices'])} CPU kernel choices from {path}" in capsys.readouterr().err
    path.write_text("{}")
    assert cli.main(argv) == 2
    assert "resnet-fused bench: error: " in capsys.readouterr().err
