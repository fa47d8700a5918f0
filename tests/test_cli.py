import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused import bench, cli, ops, reference
from resnet_fused.backends import torch_backend
from utils import assert_close


def test_info_lists_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch           {torch.__version__}" in out
    for name in ops.BACKENDS:
        assert f"| {name}" in out
    isa = next(line for line in out.splitlines() if line.strip().startswith("ISA:")).split()[1:]
    assert isa == bench.cpu_flags() or (isa == ["none", "of", "note"] and not bench.cpu_flags())


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

    max_pool2d = staticmethod(torch_backend.max_pool2d)
    global_avg_pool = staticmethod(torch_backend.global_avg_pool)
    linear = staticmethod(torch_backend.linear)


@pytest.fixture
def add_backend(monkeypatch):
    """Register a test backend with the dispatcher and the command line's list of names."""
    def add(module):
        monkeypatch.setitem(ops.BACKENDS, module.NAME, module)
        monkeypatch.setattr(cli, "BACKEND_NAMES", (*cli.BACKEND_NAMES, module.NAME))
        ops._resolve.cache_clear()
    yield add
    ops._resolve.cache_clear()


def test_verify_fails_on_a_wrong_backend(add_backend, capsys):
    add_backend(_Broken)
    assert cli.main(["verify", "--model", "resnet18", "--backend", "broken", "--size", "32"]) == 1
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("flag, expected", [([], True), (["--no-cudnn-benchmark"], False)])
def test_bench_on_cuda_records_the_cudnn_search(flag, expected, tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--device", "cuda", "--model", "resnet18", "--size", "32", "--batch", "2", "--repeat", "1",
            "--warmup", "1", "--backend", "torch", "--json", str(path), "--no-progress", *flag]
    previous = torch.backends.cudnn.benchmark
    try:
        assert cli.main(argv) == 0
    finally:
        torch.backends.cudnn.benchmark = previous
    assert json.loads(path.read_text())["environment"]["cudnn_benchmark"] is expected


def test_bench_on_cpu_leaves_cudnn_alone(tmp_path, capsys):
    argv = ["bench", "--model", "resnet18", "--size", "32", "--batch", "1", "--repeat", "1", "--warmup", "0",
            "--backend", "torch", "--no-progress"]
    previous = torch.backends.cudnn.benchmark
    assert cli.main(argv) == 0 and torch.backends.cudnn.benchmark == previous
    assert cli.main([*argv, "--no-cudnn-benchmark"]) == 0 and torch.backends.cudnn.benchmark == previous


def _installed(*modules) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.parametrize("blocked", [None, "onnxruntime"])
def test_bench_peers(blocked, tmp_path, monkeypatch, capsys):
    if blocked:
        monkeypatch.setitem(sys.modules, blocked, None)  # what an import of a package not installed does
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", "resnet18", "--size", "32", "--batch", "2", "--repeat", "2", "--warmup", "1",
            "--backend", "torch", "--peers", "--json", str(path), "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    record = json.loads(path.read_text())
    results = {r["variant"]: r for r in record["results"]}
    expected = {"ONNX Runtime": "onnxruntime", "OpenVINO f32": "openvino"}
    for variant, module in expected.items():
        if module != blocked and _installed("onnx", module):
            r = results[variant]
            assert r["kind"] == "peer" and r["median_ms"] > 0 and r["rel_error_vs_fp64"] < 1e-4
            assert record["environment"][module] and f"| {variant}" in captured.out
        else:
            assert variant not in results
            label = variant.split(" f32")[0]
            note = f"{label} skipped: {module} is not installed (pip install 'resnet-fused[peers]')"
            assert note in record["notes"] and f"note: {note}" in captured.err
    peers = [r for r in record["results"] if r["kind"] == "peer"]
    best = min(r["median_ms"] for r in peers) if peers else None
    for r in record["results"]:
        assert r["speedup_vs_best_peer"] == (pytest.approx(best / r["median_ms"]) if best else None)
    env = record["environment"]
    assert env["cpu_model"] and set(env["cpu_flags"]) <= set(bench.ISA_FLAGS)


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


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and "Traceback" not in captured.err, captured.err
    assert captured.out == ""
    return lines[-1]  # the lines before it, if any, are progress ("[  1.2s] loading torch ...")


# Mistakes visible in the arguments alone: refused by the parser, before torch is imported.
ARGUMENT_ERRORS = [
    (["verify", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["bench", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["bench", "--batch", "-1"], "argument --batch: must be at least 1, got -1"),
    (["verify", "--size", "0"], "argument --size: must be at least 1"),
    (["bench", "--repeat", "0"], "argument --repeat: must be at least 1"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be 0 or more"),
    (["verify", "--batch", "two"], "expected a whole number, got 'two'"),
    (["verify", "--model", "resnet7"], "unknown model 'resnet7'"),
    (["verify", "--model", "resnet51"], "(did you mean resnet50"),
    (["verify", "--model", "keras:resnet50"], "unknown model family 'keras'"),
    (["verify", "--model", "timm:"], "'timm:' names no model"),
    (["verify", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["verify", "--device", "gpu"], "unknown device 'gpu'"),
    (["verify", "--backend", "nope"], "unknown backend 'nope'"),
    (["verify", "--weights", "/nonexistent.pt"], "weights file not found: /nonexistent.pt"),
    (["verify", "--weights", "/"], "/ is a directory"),
    (["verify", "--weights", __file__], "is not a PyTorch checkpoint"),
    (["bench", "--model", "resnet18", "resnet50"], "bench times one model per run"),
    (["bench", "--json", "/nonexistent/folder/out.json"], "folder /nonexistent/folder does not exist"),
    (["export", "--out", "/nonexistent/folder/m.pt2"], "folder /nonexistent/folder does not exist"),
    (["export"], "the following arguments are required: --out"),
    (["export", "--out", "model.onnx"], "'model.onnx' does not end in .pt2"),
    (["export", "--out", "m.pt2", "--aoti", "m.so"], "argument --aoti: 'm.so' does not end in .pt2"),
    (["bench", "--tuning", "/nonexistent.json"], "tuning file not found: /nonexistent.json (resnet-fused tune writes one)"),
    (["bench", "--tuning", "/"], "/ is a folder, not a tuning file"),
    (["tune"], "the following arguments are required: --out"),
    (["tune", "--out", "t.json", "--batch", "1", "0"], "argument --batch: must be at least 1, got 0"),
    (["tune", "--out", "/nonexistent/folder/t.json"], "folder /nonexistent/folder does not exist"),
    (["tune", "--out", "t.json", "--model", "resnet7"], "unknown model 'resnet7'"),
]


@pytest.mark.parametrize("argv,message", ARGUMENT_ERRORS)
def test_argument_errors_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"resnet-fused {argv[0]}: error: ") and message in line, line


def test_help_and_argument_errors_import_no_torch():
    # torch alone takes seconds to import: --help and argument errors must answer without it. A
    # fresh interpreter, as the console script runs, and a check that torch was never imported.
    code = (
        "import sys\n"
        "import resnet_fused, resnet_fused.cli as cli\n"
        "assert resnet_fused.__version__\n"
        f"codes = [cli.main(argv) for argv in {[argv for argv, _ in ARGUMENT_ERRORS]!r}]\n"
        "codes += [cli.main(['--help']), cli.main(['verify', '--help']), cli.main(['--version'])]\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'numpy', 'resnet_fused.ops') if m in sys.modules)\n"
        "print(codes, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"{[2] * len(ARGUMENT_ERRORS) + [0, 0, 0]} []"


def test_package_names_resolve_lazily():
    code = ("import sys, resnet_fused\n"
            "assert 'torch' not in sys.modules\n"
            "from resnet_fused import fuse, fold_bn, ops, available_backends, BackendUnavailableError\n"
            "assert fuse is resnet_fused.convert.fuse and 'torch' in sys.modules\n"
            "assert set(resnet_fused.__all__) <= set(dir(resnet_fused)) and 'export' in dir(resnet_fused)\n"
            "assert not hasattr(resnet_fused, '__main__')  # a probe must not run the command line\n"
            "assert resnet_fused.export.__name__ == 'resnet_fused.export'\n"
            "try:\n    resnet_fused.nonexistent\nexcept AttributeError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "has no attribute 'nonexistent'" in done.stdout


def test_names_known_to_the_parser_are_the_packages():
    assert cli.MODEL_NAMES == tuple(reference.MODELS)
    assert cli.BACKEND_NAMES == tuple(ops.BACKENDS)
    assert {name: str(dtype) for name, dtype in cli.DTYPES.items()} == \
        {name: f"torch.{canonical}" for name, canonical in cli.DTYPE_NAMES.items()}


@pytest.fixture
def no_model_building(monkeypatch):
    """Mistakes that need torch to see are still found before any model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(reference, "random_model", refuse)


class _Unavailable:
    NAME = "unavailable"

    @staticmethod
    def unavailable_reason(device_type, dtype):
        return "it was switched off for this test"


def _checkpoint_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    files = {"evil": {"x": Evil()}, "list": [torch.ones(2)], "misfit": {"fc.weight": torch.ones(3, 3)}}
    for name, content in files.items():
        torch.save(content, tmp_path / f"{name}.pt")
    torch.save({"w": torch.ones(1000)}, tmp_path / "good.pt")
    (tmp_path / "damaged.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["--model", "timm:resnet51"], "timm has no model 'resnet51' (did you mean"),
    (["--model", "torchvision:resnet51"], "torchvision has no classification model 'resnet51'"),
    (["--device", "cuda:99"], "device cuda:99 asked for, but"),
    (["--backend", "unavailable"], "backend 'unavailable' cannot run on cpu with torch.float32: it was switched off"),
    (["--weights", "{tmp}/evil.pt"], "holds more than tensors and is refused (loaded with weights_only=True"),
    (["--weights", "{tmp}/list.pt"], "holds a list that is not a state dict of tensors"),
    (["--weights", "{tmp}/damaged.pt"], "is a damaged or unknown checkpoint: PytorchStreamReader failed"),
    (["--model", "resnet18", "--weights", "{tmp}/misfit.pt"],
     "misfit.pt does not fit the model (122 tensors): 121 missing: conv_1.weight, bn_1.weight, bn_1.bias, ...; "
     "1 of the wrong shape: fc.weight: 3x3 in the file, 1000x512 in the model"),
])
@pytest.mark.parametrize("command", ["verify", "bench", "export"])
def test_errors_found_before_slow_work_exit_2(command, argv, message, tmp_path, add_backend, capsys, no_model_building):
    add_backend(_Unavailable)
    argv = [a.format(tmp=_checkpoint_files(tmp_path)) for a in argv]
    extra = ["--out", str(tmp_path / "m.pt2")] if command == "export" else []
    # (a misfit checkpoint is found once the model's skeleton exists, built without random_model)
    assert cli.main([command, *argv, *extra]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"resnet-fused {command}: error: ") and message in line, line
    assert not (tmp_path / "m.pt2").exists()


def test_console_script_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "resnet_fused", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("resnet-fused ")


def test_export_writes_files_that_load_in_a_fresh_process(tmp_path, capsys):
    # One command writes both kinds (the AOTInductor package compiles C++: the slow part).
    program, package = tmp_path / "r18.pt2", tmp_path / "r18.aoti.pt2"
    argv = ["export", "--model", "resnet18", "--size", "32", "--batch", "2", "--backend", "torch", "--seed", "3",
            "--out", str(program), "--aoti", "--no-progress"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.endswith(": ok") for line in lines), lines
    assert [re.search(r", batch (\d+):", line).group(1) for line in lines] == ["2", "3"] * 2
    assert [line.split(" /")[0] for line in lines] == ["torch.export program"] * 2 + ["AOTInductor package"] * 2
    # The files stand alone: a new interpreter loads them and gives the fused model's outputs here.
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "from resnet_fused import export\n"
            "x = torch.load(sys.argv[1])\n"
            "outs = [export.load(path)(x) for path in sys.argv[2:]]\n"
            "torch.save(outs, sys.argv[1] + '.out')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pt"), str(program), str(package)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    model = cli.build_model("resnet18", weights=None, seed=3)
    with torch.inference_mode():
        expected = resnet_fused.fuse(model, backend="torch")(x)
        reference_out = model.double()(x.double())
    for out in torch.load(tmp_path / "x.pt.out"):
        assert_close(out, reference_out)  # a batch of 5: neither example batch
        assert_close(out, expected)


def test_export_failure_and_mismatch(tmp_path, monkeypatch, capsys):
    from resnet_fused import export

    argv = ["export", "--model", "resnet18", "--size", "32", "--batch", "1", "--backend", "torch",
            "--out", str(tmp_path / "m.pt2"), "--no-progress"]

    def refuse(*args, **kwargs):
        raise export.ExportError("ResNet exports only for a fixed batch size\nsecond line")

    monkeypatch.setattr(export, "save_program", refuse)
    assert cli.main(argv) == 2
    assert _one_error_line(capsys) == ("resnet-fused export: error: ResNet exports only for a fixed batch size "
                                       "second line")

    def save_fused(module, example_inputs, path, *, dynamic_batch):
        saved.append(module)
        return str(path)

    def load_wrong(path):
        return lambda x: saved[0](x) * 1.001  # off by 0.1%: far beyond fp32's bound

    saved = []
    monkeypatch.setattr(export, "save_program", save_fused)
    monkeypatch.setattr(export, "load", load_wrong)
    assert cli.main([*argv, "--static-batch"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("MISMATCH") == 1 and "export: MISMATCH" in captured.err
