import json
import subprocess
import sys

import pytest
import torch
import torchvision

from resnet_fused import cli, ops
from resnet_fused.backends import torch_backend


def test_info_lists_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch           {torch.__version__}" in out
    for name in ops.BACKENDS:
        assert f"| {name}" in out


def test_verify_passes_on_a_good_backend(capsys):
    assert cli.main(["verify", "--model", "resnet18", "--backend", "torch", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "| resnet18" in out and "ok" in out and "MISMATCH" not in out


class _Broken:
    """A backend that gets one element of every conv wrong: verify must notice."""

    NAME = "broken"

    @staticmethod
    def unavailable_reason(device_type, dtype):
        return None

    @staticmethod
    def conv_bias_act(*args):
        out = torch_backend.conv_bias_act(*args)
        out[0, 0, 0, 0] += 1.0
        return out


def test_verify_fails_on_a_wrong_backend(monkeypatch, capsys):
    monkeypatch.setitem(ops.BACKENDS, "broken", _Broken)
    ops._resolve.cache_clear()
    try:
        assert cli.main(["verify", "--model", "resnet18", "--backend", "broken", "--size", "32"]) == 1
    finally:
        ops._resolve.cache_clear()
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "MISMATCH" in captured.err


def test_bench_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", "resnet18", "--size", "32", "--batch", "2", "--repeat", "2", "--warmup", "1",
            "--backend", "torch", "--json", str(path), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "fused torch" in out and "vs eager" in out
    record = json.loads(path.read_text())
    names = [r["variant"] for r in record["results"]]
    assert names == ["eager", "eager channels_last", "fused torch"]
    for r in record["results"]:
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 2 and r["rel_error_vs_fp64"] < 1e-4
    assert record["environment"]["torch"] == torch.__version__


def test_weights_file_round_trip_and_untrusted_pickle(tmp_path, capsys):
    tv = torchvision.models.resnet18()
    good = tmp_path / "tv.pt"
    torch.save({"state_dict": tv.state_dict()}, good)
    assert cli.main(["verify", "--model", "resnet18", "--backend", "torch", "--size", "32", "--weights", str(good)]) == 0

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    assert cli.main(["verify", "--model", "resnet18", "--weights", str(evil)]) == 2
    assert "weights_only=True" in capsys.readouterr().err


def test_each_command_has_its_own_defaults():
    parser = cli._parser()
    bench, verify = parser.parse_args(["bench"]), parser.parse_args(["verify"])
    assert (bench.batch, bench.size) == (1, 224)
    assert (verify.batch, verify.size) == (2, 64)


@pytest.mark.parametrize("argv,message", [
    (["verify", "--model", "resnet7"], "unknown model 'resnet7'"),
    (["verify", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["verify", "--device", "cuda"] if not torch.cuda.is_available() else ["verify", "--device", "nonsense"], "device"),
    (["verify", "--backend", "nope"], "unknown backend 'nope'"),
    (["verify", "--weights", "/nonexistent.pt"], "weights file not found"),
])
def test_usage_errors_exit_2_with_a_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "resnet_fused", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("resnet-fused ")
