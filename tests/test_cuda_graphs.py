"""resnet_fused.cuda_graphs: a fused model replayed from CUDA graphs, one per input signature.

The error paths and the signature / cache logic run on CPU; capture and replay are marked ``gpu``.
GPU tests use the extension backend (no Triton compiles) and small inputs; a replay runs the same
kernels as the un-graphed call, so results are compared at torch's default tolerances.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import cuda_graphs
from resnet_fused.accuracy import judge
from resnet_fused.cuda_graphs import CudaGraphWarning, GraphedModule, graphed, input_key
from resnet_fused.reference import random_model


@pytest.fixture(scope="module")
def resnet18():
    return random_model("resnet18", num_classes=10, calibration_size=32)


# --- CPU: refusals ---------------------------------------------------------------------------


def test_refuses_training_mode(resnet18):
    with pytest.raises(ValueError, match="eval mode"):
        graphed(copy.deepcopy(resnet18).train())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_shapes=0), "max_shapes"),
        (dict(max_shapes=True), "max_shapes"),
        (dict(max_shapes=2.0), "max_shapes"),
        (dict(warmup=0), "warmup"),
        (dict(when_full="drop"), "when_full"),
    ],
)
def test_refuses_bad_options(resnet18, kwargs, match):
    with pytest.raises(ValueError, match=match):
        graphed(resnet18, **kwargs)


def test_refuses_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        graphed(lambda x: x)


def test_refuses_cpu_input_and_bad_calls(resnet18):
    g = graphed(resnet18)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="CUDA input.*cpu"):
        g(x)
    with pytest.raises(TypeError, match="one tensor"):
        g(x, x)
    with pytest.raises(TypeError, match="takes a tensor"):
        g([x])
    with pytest.raises(ValueError, match="requires grad"):
        g(x.requires_grad_())
    assert g.captured() == []


def test_inference_only(resnet18):
    g = graphed(resnet18)
    assert not g.training
    assert g.eval() is g
    with pytest.raises(ValueError, match="inference-only"):
        g.train()
    assert not g.training and not resnet18.training


def test_model_in_training_mode_after_wrapping_is_refused(resnet18):
    model = copy.deepcopy(resnet18)
    g = graphed(model)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        g(torch.randn(1, 3, 8, 8))


# --- CPU: signatures and the cache ------------------------------------------------------------


def test_input_key_separates_shape_dtype_and_layout():
    x = torch.randn(2, 8, 5, 5)
    keys = {
        input_key(x),
        input_key(x[:1]),
        input_key(x.half()),
        input_key(x.contiguous(memory_format=torch.channels_last)),
    }
    assert len(keys) == 4
    # A sliced (non-dense) view is served by the dense graph of its shape: the copy into the
    # static buffer densifies it.
    assert input_key(torch.randn(2, 8, 5, 10)[..., ::2]) == input_key(x)
    # A single channel is both layouts at once: one signature, not two.
    one = torch.randn(2, 1, 5, 5)
    assert input_key(one) == input_key(one.contiguous(memory_format=torch.channels_last))


def test_lru_evicts_least_recently_used():
    lru = cuda_graphs.LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "a" is now the most recent
    lru.put("c", 3)
    assert lru.keys() == ["a", "c"] and lru.get("b") is None
    lru.put("a", 4)  # replacing an entry evicts nothing
    assert lru.keys() == ["c", "a"] and lru.get("a") == 4 and len(lru) == 2


class FakeCapture:
    """Stands in for cuda_graphs.capture on CPU: records what was captured, fails on request."""

    def __init__(self, fail_on=()):
        self.calls = []
        self.fail_on = set(fail_on)

    def __call__(self, module, example, memory_format, warmup):
        self.calls.append(tuple(example.shape))
        if tuple(example.shape) in self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        return object()


def test_new_shapes_evict_when_full(resnet18, monkeypatch):
    fake = FakeCapture()
    monkeypatch.setattr(cuda_graphs, "capture", fake)
    g = GraphedModule(resnet18, max_shapes=2)
    a, b, c = (torch.randn(n, 3, 8, 8) for n in (1, 2, 3))
    for x in (a, b, c):
        assert g._new_graph(input_key(x), x) is not None
    assert [k[0] for k in g.captured()] == [(2, 3, 8, 8), (3, 3, 8, 8)]
    assert fake.calls == [(1, 3, 8, 8), (2, 3, 8, 8), (3, 3, 8, 8)]


def test_new_shapes_run_eagerly_when_full_with_one_warning(resnet18, monkeypatch):
    fake = FakeCapture()
    monkeypatch.setattr(cuda_graphs, "capture", fake)
    g = GraphedModule(resnet18, max_shapes=1, when_full="eager")
    a, b, c = (torch.randn(n, 3, 8, 8) for n in (1, 2, 3))
    assert g._new_graph(input_key(a), a) is not None
    with pytest.warns(CudaGraphWarning, match="max_shapes"):
        assert g._new_graph(input_key(b), b) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CudaGraphWarning)
        assert g._new_graph(input_key(c), c) is None
    assert fake.calls == [(1, 3, 8, 8)]
    assert [k[0] for k in g.captured()] == [(1, 3, 8, 8)]


def test_failed_capture_runs_eagerly_and_is_not_retried(resnet18, monkeypatch):
    fake = FakeCapture(fail_on={(2, 3, 8, 8)})
    monkeypatch.setattr(cuda_graphs, "capture", fake)
    g = GraphedModule(resnet18, max_shapes=4)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(CudaGraphWarning, match="failed.*RuntimeError.*capturing"):
        assert g._new_graph(input_key(x), x) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CudaGraphWarning)
        assert g._new_graph(input_key(x), x) is None
    assert fake.calls == [(2, 3, 8, 8)] and g.captured() == []


# --- GPU: capture and replay ----------------------------------------------------------------

gpu = pytest.mark.gpu
DEVICE = "cuda"


@pytest.fixture(scope="module")
def fused16(resnet18):
    return resnet_fused.fuse(copy.deepcopy(resnet18).to(DEVICE), backend="extension", dtype=torch.float16)


def images(batch, size=32, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)


def reference(model, x):
    with torch.inference_mode():
        return copy.deepcopy(model).double()(x.cpu().double())


@gpu
def test_graphed_matches_ungraphed_and_reference(resnet18, fused16):
    g = graphed(fused16)
    x = images(2)
    with torch.inference_mode():
        eager = fused16(x)
        first = g(x)  # warm-up + capture
        replayed = g(x)
    assert len(g.captured()) == 1
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(replayed, eager)
    with torch.inference_mode():
        unfused = copy.deepcopy(resnet18).to(DEVICE, torch.float16)(x)
    verdict = judge(replayed, unfused, reference(resnet18, x))
    assert verdict.ok, verdict


@gpu
def test_two_shapes_each_replay_their_own_graph(resnet18, fused16):
    g = graphed(fused16, max_shapes=2)
    small, large = images(1, seed=1), images(3, seed=2)
    with torch.inference_mode():
        outs = [g(small), g(large), g(small), g(large)]
        want = [fused16(small), fused16(large)]
    assert [k[0] for k in g.captured()] == [(1, 3, 32, 32), (3, 3, 32, 32)]
    for out, expected in zip(outs, want * 2):
        torch.testing.assert_close(out, expected)
    # A fresh input of a captured shape is copied in, not the capture's example replayed.
    other = images(1, seed=9)
    with torch.inference_mode():
        torch.testing.assert_close(g(other), fused16(other))


@gpu
def test_results_are_not_overwritten_by_later_calls(fused16):
    g = graphed(fused16)
    x1, x2 = images(2, seed=3), images(2, seed=4)
    with torch.inference_mode():
        out1 = g(x1)
        saved = out1.clone()
        out2 = g(x2)
    torch.testing.assert_close(out1, saved)
    assert out1.data_ptr() != out2.data_ptr()
    assert not torch.equal(out1, out2)


@gpu
def test_copy_output_false_returns_the_graphs_buffer(fused16):
    g = graphed(fused16, copy_output=False)
    x1, x2 = images(2, seed=5), images(2, seed=6)
    with torch.inference_mode():
        out1 = g(x1)
        first = out1.clone()
        out2 = g(x2)
        expected2 = fused16(x2)
    assert out2.data_ptr() == out1.data_ptr()  # as documented: the next call overwrites it
    torch.testing.assert_close(out1, expected2)
    assert not torch.equal(first, expected2)


@gpu
def test_full_cache_falls_back_to_eager_once(fused16):
    g = graphed(fused16, max_shapes=1, when_full="eager")
    a, b, c = images(1, seed=7), images(2, seed=7), images(3, seed=7)
    with torch.inference_mode():
        g(a)
        with pytest.warns(CudaGraphWarning, match="max_shapes"):
            out_b = g(b)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CudaGraphWarning)
            out_c = g(c)
        torch.testing.assert_close(out_b, fused16(b))
        torch.testing.assert_close(out_c, fused16(c))
    assert [k[0] for k in g.captured()] == [(1, 3, 32, 32)]


@gpu
def test_evicting_recaptures(fused16):
    g = graphed(fused16, max_shapes=1)
    a, b = images(1, seed=8), images(2, seed=8)
    with torch.inference_mode():
        g(a)
        g(b)
        assert [k[0] for k in g.captured()] == [(2, 3, 32, 32)]
        torch.testing.assert_close(g(a), fused16(a))
    assert [k[0] for k in g.captured()] == [(1, 3, 32, 32)]


@gpu
def test_outside_inference_mode_and_nchw_input(fused16):
    """Captured without inference mode, then replayed inside it, with an NCHW input (its own
    signature)."""
    g = graphed(fused16)
    x = images(2, seed=10).contiguous()
    with torch.no_grad():
        out = g(x)
    with torch.inference_mode():
        again = g(x)
        expected = fused16(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)
    assert g.captured()[0][3] == torch.contiguous_format


class Syncs(nn.Module):
    """A model that synchronises with the host: not capturable."""

    def forward(self, x):
        return x * float(x.abs().max().item())


@gpu
def test_uncapturable_model_runs_eagerly_with_a_warning():
    g = graphed(Syncs().eval())
    x = torch.randn(4, 4, device=DEVICE)
    with pytest.warns(CudaGraphWarning, match="failed"):
        out = g(x)
    torch.testing.assert_close(out, Syncs()(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CudaGraphWarning)
        torch.testing.assert_close(g(x), Syncs()(x))
    assert g.captured() == []


@gpu
def test_inside_a_callers_capture_runs_the_model(fused16):
    g = graphed(fused16)
    x = images(1, seed=11)
    with torch.inference_mode():
        expected = fused16(x)  # warm: nothing left to tune during the capture below
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = g(x)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)
    assert g.captured() == []
