"""Post-training static int8 quantisation on CPU (torchao's PT2E flow), saved as spec + tensors.

The flow is the one PyTorch maintains since FX graph mode (``torch.ao.quantization.quantize_fx``)
was deprecated: ``torch.export`` captures the float network (batch dimension dynamic),
torchao's ``prepare_pt2e`` with ``X86InductorQuantizer`` (per-channel int8 weights, uint8
activations, conv-BN folded) inserts observers, the calibration batch is run through it and
``convert_pt2e`` leaves a graph of quantize/dequantize ops around float convs and linears.

Stored form (``Int8Net.qmodel``): that converted graph, with the activation scales and zero
points it carries as literals lifted into buffers, and the unused float weights dropped. Its
state dict is plain tensors (int8 weights, scales, zero points, float biases), which
``torch.load(weights_only=True)`` admits. The graph is a function of the float architecture
alone, so a checkpoint rebuilds it from the float spec (with a dummy calibration) and then loads
the tensors: no GraphModule is ever unpickled.

Run form: the converted graph computes in float (dequantize, float kernel, quantize), which is
slower than the float network. ``forward`` therefore runs a graph lowered from it with torchao's
x86 recipe (inductor's freezing passes fuse each q/dq pattern into oneDNN ``qconv_pointwise`` /
``qlinear_pointwise`` int8 kernels), built lazily and again after ``load_state_dict``; it is
still an eager FX graph, no code generation. Measured on one thread of an AMD EPYC (avx512_vnni,
benchmarks/results/int8-latency-2026-11-29.md): int8 is about 2x faster than float at batch 64
but at batch 1 slower on small nets, where per-op overhead dominates (digits BaseNet 0.27 vs
0.05 ms), and faster only on large ones (seed CIFAR BaseNet 0.50 vs 2.0 ms). The
pipeline measures and serves batch 1: compare ``latency`` with that of ``dense_twin(model)``.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, fx, nn

from shrinkflow.models.registry import build_model

SCHEME = "pt2e-x86-static-int8"
SCHEMES = (SCHEME,)  # the retired "fx-static-int8" checkpoints are refused by name (retrain those)

# torch.export, torchao's prepare/convert and inductor's freezing passes keep process-wide state
# (dynamo caches, pattern registries); candidates are shrunk in threads, so one at a time.
_LOCK = threading.RLock()

_QD = None  # torch.ops.quantized_decomposed, registered by importing torchao's pt2e package


def _ops() -> Any:
    global _QD
    if _QD is None:
        import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed ops)

        _QD = torch.ops.quantized_decomposed
    return _QD


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch.export and torchao warn about their own internals (pytree registrations, deprecations).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _example(spec: dict[str, Any]) -> tuple[Tensor]:
    # Two images: torch.export specialises a batch of one, and the batch dimension is dynamic.
    return (torch.zeros(2, spec["in_channels"], spec["image_size"], spec["image_size"]),)


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def quantize_int8(model: nn.Module, float_spec: dict[str, Any], calibration: Tensor | None) -> fx.GraphModule:
    """Export, observe ``calibration`` (zeros when rebuilding for a state dict) and convert to
    the stored form (see the module docstring)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    example = _example(float_spec)
    if calibration is None:
        calibration = example[0]
    with _LOCK, _quiet(), torch.no_grad():
        _ops()
        graph = torch.export.export(
            model.eval(), example, dynamic_shapes=_dynamic_batch(), strict=True
        ).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        for start in range(0, len(calibration), 64):
            prepared(calibration[start : start + 64])
        converted = convert_pt2e(prepared)
        return _stored_form(converted)


def _set_tensor(gm: fx.GraphModule, name: str, value: Tensor) -> None:
    gm.register_buffer(name, value.detach().clone(), persistent=True)


def _stored_form(gm: fx.GraphModule) -> fx.GraphModule:
    """Activation qparams into buffers, tensors renamed by role and order, unused tensors gone."""
    qd, graph = _ops(), gm.graph
    old = dict(gm.named_parameters()) | dict(gm.named_buffers())
    renamed: dict[str, str] = {}
    for i, node in enumerate(n for n in graph.nodes if n.target == qd.dequantize_per_channel.default):
        weight, scale, zero_point = node.args[:3]
        for role, ref in (("", weight), ("_scale", scale), ("_zero_point", zero_point)):
            renamed.setdefault(ref.target, f"weight_{i}{role}")
    for old_name, new_name in renamed.items():
        _set_tensor(gm, new_name, old[old_name])
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in renamed:
            node.target = renamed[node.target]
    # quantize/dequantize_per_tensor carry scale and zero point as literals: make them tensors.
    first = next(n for n in graph.nodes if n.op != "get_attr")
    lifted: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    tensor_overload = {
        qd.quantize_per_tensor.default: qd.quantize_per_tensor.tensor,
        qd.dequantize_per_tensor.default: qd.dequantize_per_tensor.tensor,
    }
    act = 0
    for node in list(graph.nodes):
        if node.target not in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default):
            continue
        source = node.args[0]
        if node.target == qd.dequantize_per_tensor.default and source in lifted:
            refs = lifted[source]  # a dequantize shares the qparams of the quantize it undoes
        else:
            _set_tensor(gm, f"act_{act}_scale", torch.tensor(node.args[1], dtype=torch.float32))
            _set_tensor(gm, f"act_{act}_zero_point", torch.tensor(node.args[2], dtype=torch.int64))
            with graph.inserting_before(first):
                refs = (graph.get_attr(f"act_{act}_scale"), graph.get_attr(f"act_{act}_zero_point"))
            act += 1
        lifted[node] = refs
        node.target = tensor_overload[node.target]
        node.args = (source, *refs, *node.args[3:])
    graph.eliminate_dead_code()
    _drop_unused(gm)
    return gm


def _drop_unused(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [*dict(gm.named_parameters()), *dict(gm.named_buffers())]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def inlined(stored: fx.GraphModule) -> fx.GraphModule:
    """A copy of the stored graph with activation qparams back as literals, as lowering expects."""
    qd = _ops()
    literal_overload = {
        qd.quantize_per_tensor.tensor: qd.quantize_per_tensor.default,
        qd.dequantize_per_tensor.tensor: qd.dequantize_per_tensor.default,
    }
    gm = copy.deepcopy(stored)
    for node in gm.graph.nodes:
        if node.target in literal_overload:
            scale, zero_point = (getattr(gm, ref.target) for ref in node.args[1:3])
            node.target = literal_overload[node.target]
            node.args = (node.args[0], float(scale), int(zero_point), *node.args[3:])
    gm.graph.eliminate_dead_code()
    _drop_unused(gm)
    return gm


def lower_x86(stored: fx.GraphModule, example: tuple[Tensor]) -> fx.GraphModule:
    """The stored graph with its q/dq patterns fused into oneDNN int8 kernels (torchao's
    ``lower_pt2e_quantized_to_x86`` recipe, keeping the batch dimension dynamic)."""
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    aten = torch.ops.aten
    with _LOCK, _quiet(), torch.no_grad():
        # Post-autograd: decompose only the composite-implicit ops, as torchao's recipe does.
        table = torch.export.default_decompositions()
        decompositions = {op: fn for op, fn in table.items() if torch._export.utils._is_cia_op(op)}
        lowered = (
            torch.export.export(inlined(stored), example, dynamic_shapes=_dynamic_batch(), strict=True)
            .run_decompositions(decompositions)
            .module()
        )
        for node in list(lowered.graph.nodes):
            if node.target == aten.t.default:  # the fusion patterns match permute, not t
                with lowered.graph.inserting_before(node):
                    permuted = lowered.graph.call_function(aten.permute.default, (node.args[0], [1, 0]))
                node.replace_all_uses_with(permuted)
                lowered.graph.erase_node(node)
        lowered.recompile()
        freezing_passes(lowered, example)
        constant_fold(lowered)
        for node in lowered.graph.nodes:
            if node.target == aten.view.default:  # oneDNN outputs are channels-last: view cannot
                node.target = aten.reshape.default
        lowered.recompile()
        return lowered


class Int8Net(nn.Module):
    """A quantised network plus the float spec it came from (which also rebuilds it)."""

    ARCH = "int8"  # in a spec only: rebuilt by models/checkpoint.py, never declared in params.yaml

    def __init__(
        self, float_spec: dict[str, Any], scheme: str = SCHEME, qmodel: fx.GraphModule | None = None
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantisation scheme {scheme!r}; only {SCHEME!r} is supported")
        self.float_spec = float_spec
        self.scheme = scheme
        self.qmodel = (
            qmodel if qmodel is not None else quantize_int8(build_model(float_spec), float_spec, None)
        )
        self.qmodel.requires_grad_(False)
        self._drop_lowered()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._drop_lowered())

    def _drop_lowered(self) -> None:
        # Not a submodule: its packed oneDNN weights are derived, never saved or loaded.
        self.__dict__["_lowered"] = None

    def lowered(self) -> fx.GraphModule:
        """The int8-kernel graph ``forward`` runs, built from the stored tensors on first use."""
        if self.__dict__["_lowered"] is None:
            with _LOCK:
                if self.__dict__["_lowered"] is None:
                    self.__dict__["_lowered"] = lower_x86(self.qmodel, _example(self.float_spec))
        return self.__dict__["_lowered"]

    def forward(self, x: Tensor) -> Tensor:
        return self.lowered()(x)

    def reference(self, x: Tensor) -> Tensor:
        """The stored q/dq graph run in float: the same numbers as ``forward`` up to rounding."""
        return self.qmodel(x)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lowered"] = None
        return state

    def spec(self) -> dict[str, Any]:
        return {"arch": self.ARCH, "scheme": self.scheme, "float_spec": self.float_spec}

    def float_equivalent(self) -> nn.Module:
        """An (untrained) float network of the same shapes: what FLOPs and params are counted on,
        since the counters do not see quantised kernels, and the twin its latency is compared with."""
        return build_model(self.float_spec).eval()

    def train(self, mode: bool = True) -> Int8Net:
        if mode:
            raise RuntimeError("an int8 model cannot be trained; quantise after fine-tuning")
        self.training = False  # exported graphs refuse .train()/.eval(); they are inference-only
        return self


def is_int8(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) an int8 network."""
    return any(isinstance(m, Int8Net) for m in model.modules())


def dense_twin(model: nn.Module) -> nn.Module:
    """The float network whose shapes ``model`` has (``model`` itself unless it is quantised):
    count params and FLOPs on it, and compare an int8 model's latency with it."""
    return model.float_equivalent() if isinstance(model, Int8Net) else model
