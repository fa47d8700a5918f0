"""Fused models under torch.compile and torch.export on every backend, and resnet_fused.export's files
loaded back, in this process and in a fresh one.

Models are as small as still exercises every fused op (a stem, blocks with and without a
downsample shortcut): Inductor and AOTInductor compile C++ for every graph. The triton backend
runs through Triton's interpreter on CPU, so it gets a single fused block.
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import export, ops, reference
from resnet_fused.modules import FusedConvBNAct, FusedStage, GlobalAvgPool2d, Linear, MaxPool2d
from utils import REL_TOL, assert_close, reference_conv_bias_act, rel_error

BACKENDS = ["torch", "extension", "onednn", "triton"]


def _tiny_resnet(seed: int) -> nn.Module:
    # resnet18's layout with one block per stage: the stem, a block without and three with a
    # downsample shortcut.
    return reference.random_model(
        lambda num_classes: reference.ResNet(reference.BasicBlock, [1, 1, 1, 1], num_classes),
        num_classes=10,
        seed=seed,
        calibration_size=32,
    )


def _block(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    shortcut = nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    block = reference.BasicBlock(8, 16, stride=2, down_sample=shortcut)
    reference.randomize_bn(block, seed=seed)
    block.train()
    with torch.no_grad():  # realistic BN statistics, so the output depends on the input
        block(torch.randn(16, 8, 10, 10))
    return block.eval()


def _case(backend: str, seed: int = 0):
    """(eager model, fused model, input): a tiny ResNet on CPU, or a fused block for triton (on the
    GPU if there is one, else through the interpreter)."""
    if backend == "triton":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, x = _block(seed), torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(seed))
    else:
        device = "cpu"
        model, x = _tiny_resnet(seed), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    model, x = model.to(device), x.to(device)
    return model, resnet_fused.fuse(model, backend=backend), x


def _float64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return copy.deepcopy(model).double()(x.double())


def _eager(fused: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return fused(x)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles the same forward code objects on new modules: start from no cached graphs,
    # so no test meets the recompile limit because of the others.
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def test_backend_choice_is_marked_as_torch_marks_a_constant():
    """ops marks resolve_backend by hand, as torch.compiler.assume_constant_result would (which
    imports torch._dynamo): if torch changes how it marks, this names the problem."""
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert vars(marked) == vars(ops.resolve_backend) == {"_dynamo_marked_constant": True}


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend, nan_filled_empty_exact_fp32):
    model, fused, x = _case(backend)
    eager = _eager(fused, x)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.inference_mode():
        out = compiled(x)
        again = compiled(x)  # the compiled graph, not the first call's tracing, computes this one
    ref = _float64(model, x)
    assert_close(out, ref)
    assert torch.equal(out, again)
    # Inductor compiles the unfused ops (pooling, the classifier) itself, so not bit for bit.
    assert rel_error(out, eager) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_ops_compile_fullgraph(backend, nan_filled_empty_exact_fp32):
    """The ops called directly (list arguments, all three ops) trace without a graph break; aot_eager
    runs the fake kernels and functionalization without compiling C++."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    x, weight, bias = torch.randn(2, 8, 7, 6, generator=g), torch.randn(12, 8, 3, 3, generator=g) / 8, torch.randn(12, generator=g)
    residual = torch.randn(2, 12, 4, 3, generator=g)
    x, weight, bias, residual = (t.to(device) for t in (x, weight, bias, residual))

    def f(x, weight, bias, residual):
        y = ops.conv_bias_act(x, weight, bias, stride=[2, 2], padding=[1, 1], residual=residual, relu=False, backend=backend)
        return ops.bias_act(ops.add_relu(y, residual, backend=backend), bias, relu=True, backend=backend)

    with torch.inference_mode():
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, weight, bias, residual)
    conv = reference_conv_bias_act(x, weight, bias, stride=2, padding=1, residual=residual, relu=False)
    assert_close(out, (conv + residual.double()).relu().add(bias.double().view(1, -1, 1, 1)).relu())


def test_compiled_model_keeps_the_eager_fast_path():
    """Eager calls go through BoundConvBiasAct's cached plan; compiling the same model must neither
    break that nor leave a plan made while tracing."""
    block = _block(seed=0)
    fused, x = resnet_fused.fuse(block, backend="extension"), torch.randn(2, 8, 10, 10)
    with torch.inference_mode():  # where eager calls would make a plan
        torch.compile(fused, fullgraph=True, backend="eager")(x)  # Dynamo's tracing is what is tested
    conv = fused.conv_1.conv
    assert conv._plan is None
    with torch.inference_mode():
        first = fused(x)
        assert conv._plan is not None
        assert torch.equal(fused(x), first)


def test_compiled_model_keeps_the_stage_calls():
    """The same for FusedStage's plan (one residual_blocks call per stage): tracing neither uses nor
    makes one, with or without a plan made by eager calls before."""
    model, fused, x = _case("extension")
    stages = [m for m in fused.modules() if isinstance(m, FusedStage)]
    assert stages
    with torch.inference_mode():
        traced_first = torch.compile(fused, fullgraph=True, backend="eager")(x)
        assert all(stage._plan is None for stage in stages)
        first, second = fused(x), fused(x)
        assert all(stage._plan is not None for stage in stages)
        torch.compiler.reset()
        traced_after = torch.compile(fused, fullgraph=True, backend="eager")(x)
    assert torch.equal(first, second) and torch.equal(traced_first, first) and torch.equal(traced_after, first)


def _fused_convs(module: nn.Module) -> int:
    return sum(isinstance(m, FusedConvBNAct) for m in module.modules())


def _conv_calls(program: torch.export.ExportedProgram) -> tuple[int, int]:
    """(aten convolutions, other non-aten ops) in the graph."""
    aten = custom = 0
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace not in ("aten", "prims"):
                custom += 1
            elif "conv" in node.target._schema.name:
                aten += 1
    return aten, custom


def _run_fresh(script: str, **paths) -> None:
    """Run ``script`` in a new Python (the same interpreter) with the given paths as variables."""
    prologue = "".join(f"{name} = {os.fspath(path)!r}\n" for name, path in paths.items())
    # fp32 convs without TF32, as in this process (nan_filled_empty_exact_fp32): the outputs are compared.
    prologue += "import torch\ntorch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False\n"
    result = subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(script)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"fresh process failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_program_round_trip(backend, tmp_path, nan_filled_empty_exact_fp32):
    """export with a dynamic batch, save, load here and in a fresh process: eager's outputs."""
    model, fused, x = _case(backend, seed=1)
    path = export.save_program(fused, (x,), tmp_path / "model.pt2")
    program = torch.export.load(path)
    aten_convs, custom_ops = _conv_calls(program)
    # Every fused conv is one op in the graph: the backend's own, or aten's for the torch backend;
    # the extension has its own max pool and head too (the other backends' are aten's).
    own = (MaxPool2d, GlobalAvgPool2d, Linear)
    others = sum(isinstance(m, own) for m in fused.modules()) if backend == "extension" else 0
    if backend == "torch":
        assert (aten_convs, custom_ops) == (_fused_convs(fused), 0)
    else:
        assert (aten_convs, custom_ops) == (0, _fused_convs(fused) + others)

    loaded = export.load(path)
    x3 = torch.randn(3, *x.shape[1:], device=x.device)  # another batch size than the example's
    with torch.inference_mode():
        assert torch.equal(loaded(x), _eager(fused, x))  # the same kernels on the same inputs
        assert_close(loaded(x3), _float64(model, x3))

    torch.save({"x": x3.cpu(), "x1": x3[:1].cpu()}, tmp_path / "inputs.pt")
    _run_fresh(
        """
        import torch
        import resnet_fused.export
        model = resnet_fused.export.load(path)
        inputs = torch.load(inputs, weights_only=True)
        with torch.inference_mode():
            outputs = {k: model(v.to(device)).cpu() for k, v in inputs.items()}
        torch.save(outputs, out)
        """,
        path=path,
        inputs=tmp_path / "inputs.pt",
        out=tmp_path / "out.pt",
        device=str(x.device),
    )
    fresh = torch.load(tmp_path / "out.pt", weights_only=True)
    here = _eager(fused, x3).cpu()
    # The extension may pick another of its kernels for a shape in another process.
    assert_close(fresh["x"], here.double(), rel=REL_TOL[torch.float32])
    assert_close(fresh["x1"], here[:1].double(), rel=REL_TOL[torch.float32])


def test_aoti_package_runs_without_resnet_fused_python(tmp_path, nan_filled_empty_exact_fp32):
    """The extension's C++ ops go into an AOTInductor package as calls by name: a fresh process
    with only torch and the extension's library (no resnet_fused Python) runs it."""
    block = _block(seed=2)
    fused = resnet_fused.fuse(block, backend="extension")
    x = torch.randn(2, 8, 10, 10)
    path = export.save_aoti_package(fused, (x,), tmp_path / "block.pt2")
    x3 = torch.randn(3, 8, 10, 10)
    with torch.inference_mode():
        assert_close(export.load(path)(x3), _float64(block, x3))

    torch.save(x3, tmp_path / "x.pt")
    _run_fresh(
        """
        import sys
        import torch
        torch.ops.load_library(library)
        model = torch._inductor.aoti_load_package(path)
        x = torch.load(x, weights_only=True)
        with torch.inference_mode():
            out = model(x), model(x[:1])
        assert not any(name.startswith("resnet_fused") for name in sys.modules), "resnet_fused was imported"
        torch.save(out, result)
        """,
        library=resnet_fused._C.__file__,
        path=path,
        x=tmp_path / "x.pt",
        result=tmp_path / "out.pt",
    )
    out, out1 = torch.load(tmp_path / "out.pt", weights_only=True)
    here = _eager(fused, x3)
    assert_close(out, here.double(), rel=REL_TOL[torch.float32])
    assert_close(out1, here[:1].double(), rel=REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "onednn"])
def test_aoti_package_refuses_python_custom_ops(backend, tmp_path):
    _, fused, x = _case(backend)
    with pytest.raises(export.ExportError, match=rf"resnet_fused_{backend}::conv_bias_act.*backend='extension'"):
        export.save_aoti_package(fused, (x,), tmp_path / "model.pt2")
    assert not (tmp_path / "model.pt2").exists()


class _FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1).sum(1)


def test_export_errors_are_clear(tmp_path):
    x = torch.randn(2, 3)
    with pytest.raises(export.ExportError, match="fixed batch size.*dynamic_batch=False"):
        export.save_program(_FixedBatch(), (x,), tmp_path / "fixed.pt2")
    assert export.load(export.save_program(_FixedBatch(), (x,), tmp_path / "fixed.pt2", dynamic_batch=False))(x).shape == (2,)
    with pytest.raises(TypeError, match=r"pass \(x,\), not x"):
        export.save_program(_FixedBatch(), x, tmp_path / "x.pt2")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        export.save_program(lambda t: t, (x,), tmp_path / "x.pt2")
    with pytest.raises(ValueError, match="must end in .pt2"):
        export.save_program(_FixedBatch(), (x,), tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="folder .* does not exist"):
        export.save_aoti_package(_FixedBatch(), (x,), tmp_path / "missing" / "model.pt2")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        export.load(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        export.load(tmp_path / "missing.pt2")


def test_batch_of_one_example_still_gives_a_dynamic_batch(tmp_path):
    block = _block(seed=3)
    x = torch.randn(3, 8, 10, 10)
    loaded = export.load(export.save_program(resnet_fused.fuse(block, backend="extension"), (x[:1],), tmp_path / "b1.pt2"))
    with torch.inference_mode():
        assert_close(loaded(x), _float64(block, x))
