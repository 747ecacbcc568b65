"""fxqat.modules.int8_chain: stretches of the INT8 model in one native call, against the flat graph's own calls.

Tolerance: none. A chain runs the same oneDNN primitives on the same codes, and copies: outputs are equal bit for
bit (``torch.equal``)."""

import copy
import io
import operator

import pytest
import torch
import torch.fx as fx

import fxqat
from fxqat import native
from fxqat.models import load_model
from fxqat.modules import int8_chain as ic
from fxqat.modules.int8 import Int8Add, Int8ConvBnAct

CL = torch.channels_last
needs_native = pytest.mark.skipif(native.library() is None, reason=f"fxqat.native unavailable: {native.status()}")


@pytest.fixture(scope="module")
def models():
    out = {}
    for spec in ("yolov8n-cls", "yolov8n", "yolo11n"):
        torch.manual_seed(0)
        qat = fxqat.prepare_qat(load_model(f"{spec}.yaml", nc=4).eval())
        fxqat.calibrate(qat, [torch.rand(2, 3, 96, 96)], progress=False)
        out[spec] = fxqat.convert(qat.eval())
    return out


def _leaves(t):
    return [t] if torch.is_tensor(t) else [z for u in (t.values() if isinstance(t, dict) else t) for z in _leaves(u)]


def _equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(torch.equal(p, q) for p, q in zip(la, lb))


def _flat(model, x):
    with ic.one_call_per_node(), torch.no_grad():
        return model(x)


def _chains(model) -> list[ic.NativeChain]:
    tw = ic._TWINS[model][1]
    return [m for m in tw.modules() if isinstance(m, ic.NativeChain)]


class _Count:
    """Counts the primitive calls made from Python (native.Conv / native.Add __call__): a chain's steps make none."""

    def __init__(self, monkeypatch):
        self.n = 0
        for cls in (native.Conv, native.Add):
            orig = cls.__call__

            def counted(prim, *a, _orig=orig):
                self.n += 1
                return _orig(prim, *a)

            monkeypatch.setattr(cls, "__call__", counted)


@needs_native
@pytest.mark.parametrize("spec", ["yolov8n-cls", "yolov8n", "yolo11n"])
def test_chains_give_the_flat_graphs_bits_in_far_fewer_python_calls(models, spec, monkeypatch):
    """Every stretch records a chain on the first call and runs it after: equal outputs, and the primitives inside
    chains are no longer called one by one from Python."""
    model = models[spec]
    x = torch.rand(1, 3, 96, 96)
    ref = _flat(model, x)
    count = _Count(monkeypatch)
    _flat(model, x)
    flat_calls = count.n
    with torch.no_grad():
        first = model(x)  # records
        count.n = 0
        again = model(x)
    assert _equal(first, ref) and _equal(again, ref)
    chains = _chains(model)
    plans = [p for c in chains for p in c._plans.values()]
    assert chains and all(plans) and len(plans) == len(chains)  # every stretch recorded, none fell back
    in_chains = sum(isinstance(c.body.get_submodule(n.target), (Int8ConvBnAct, Int8Add))
                    for c in chains for n in c.body.graph.nodes if n.op == "call_module")
    assert count.n == flat_calls - in_chains and count.n < flat_calls / 4
    assert all(len(p.buffers) < p.steps for p in plans if p.steps > 4)  # dead values' buffers are reused


@needs_native
def test_the_classifier_is_one_chain_between_its_float_ends(models):
    """yolov8n-cls: the image conv (float in) and the pool / linear / softmax tail stay outside; the rest, convs,
    adds, concats and split halves alike, is one chain."""
    model = models["yolov8n-cls"]
    with torch.no_grad():
        model(torch.rand(1, 3, 96, 96))
    (chain,) = _chains(model)
    kinds = [ic._step_kind(chain.body, n) for n in chain.body.graph.nodes if n.op not in ("placeholder", "output")]
    assert {"conv", "add", "cat", "chunk", "item", "dense"} <= set(kinds)
    assert sum(k == "conv" for k in kinds) == sum(isinstance(m, Int8ConvBnAct) for m in model.modules()) - 2


@needs_native
def test_another_shape_or_thread_count_records_again(models):
    model = models["yolov8n-cls"]
    threads = torch.get_num_threads()
    for size, t in ((96, threads), (64, threads), (96, 1)):
        torch.set_num_threads(t)
        try:
            x = torch.rand(2, 3, size, size)
            with torch.no_grad():
                model(x)
                assert _equal(model(x), _flat(model, x))
        finally:
            torch.set_num_threads(threads)
    (chain,) = _chains(model)  # its input: the image conv's output, 16 channels at half the size
    keys = {((torch.Size([2, 16, s // 2, s // 2]),), t) for s, t in ((96, threads), (64, threads), (96, 1))}
    assert keys <= set(chain._plans) and all(chain._plans[k] for k in keys)


def _with_hook(hooked, model, x) -> tuple[list, object]:
    """(what a forward hook on ``hooked`` saw, ``model(x)``), the hook removed after."""
    seen = []
    handle = hooked.register_forward_hook(lambda m, i, o: seen.append(1))
    try:
        with torch.no_grad():
            return seen, model(x)
    finally:
        handle.remove()


@needs_native
def test_a_chain_keeps_its_last_recordings_only(models):
    """Shapes that change every few calls (rectangular validation batches) do not pile up recordings: the chain
    keeps the most recently used MAX_PLANS, and a shape it dropped records again with the same outputs."""
    model = copy.deepcopy(models["yolov8n-cls"])
    sizes = [64, 96, 128, 160, 192, 224]
    xs = {s: torch.rand(1, 3, s, s) for s in sizes}
    refs = {s: _flat(model, xs[s]) for s in sizes}
    with torch.no_grad():
        for s in sizes + [64]:
            assert _equal(model(xs[s]), refs[s]) and _equal(model(xs[s]), refs[s])
    (chain,) = _chains(model)
    kept = [k[0][0][2] * 2 for k in chain._plans]
    assert len(chain._plans) == chain.MAX_PLANS == 4 and kept == [160, 192, 224, 64] and all(chain._plans.values())


@needs_native
@pytest.mark.parametrize("where", ["a chained module", "the model"])
def test_a_hook_added_after_recording_fires_and_the_outputs_stay(models, where):
    """The chain (or, for a hook on the model, the whole twin) steps aside for the nodes' own calls."""
    model = models["yolov8n"]
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    (chain, *_) = _chains(model)
    hooked = model if where == "the model" else next(
        chain.body.get_submodule(n.target) for n in chain.body.graph.nodes if n.op == "call_module")
    seen, out = _with_hook(hooked, model, x)
    assert seen == [1] and _equal(out, ref)


@needs_native
def test_a_moved_module_makes_the_chain_record_again(models):
    model = models["yolov8n-cls"]
    x = torch.rand(1, 3, 96, 96)
    key = ((torch.Size([1, 16, 48, 48]),), torch.get_num_threads())
    with torch.no_grad():
        ref = model(x)
    (chain,) = _chains(model)
    old = chain._plans[key]
    inner = next(m for m in model.modules() if isinstance(m, Int8ConvBnAct) and m._packed is not None and
                 not m.quantize_input)
    inner.cpu()  # _apply drops the module's primitive: the recorded chain is stale
    with torch.no_grad():
        assert _equal(model(x), ref) and _equal(model(x), ref)
    new = chain._plans[key]
    assert old and new and new is not old and inner._packed[3] in new.keep and inner._packed[3] not in old.keep


@needs_native
def test_copies_keep_the_bits(models):
    """deepcopy keeps chains (same class); a pickled copy is a plain GraphModule with the same outputs. (Threads
    sharing one model: tests/native/test_native.py, on a converted model, which runs chains.)"""
    model = models["yolov8n-cls"]
    x = torch.rand(1, 3, 96, 96)
    ref = _flat(model, x)
    dup = copy.deepcopy(model)
    with torch.no_grad():
        assert isinstance(dup, ic.Int8GraphModule) and _equal(dup(x), ref) and _equal(dup(x), ref)
    assert _chains(dup) and all(p for c in _chains(dup) for p in c._plans.values())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert _equal(loaded(x), ref)


@needs_native
def test_switches_off_give_the_flat_path(models, monkeypatch):
    """CHAINS = False or the direct path off: no chain is made or run; with CHAINS = False every conv and add makes
    its own call."""
    model = copy.deepcopy(models["yolov8n"])
    x = torch.rand(1, 3, 96, 96)
    monkeypatch.setattr(native, "ENABLED", False)
    with torch.no_grad():
        model(x)
    assert model not in ic._TWINS
    model = copy.deepcopy(models["yolov8n"])  # its modules made no torch-op state yet
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setattr(ic, "CHAINS", False)
    count = _Count(monkeypatch)
    with torch.no_grad():
        model(x)
        model(x)
    assert model not in ic._TWINS
    assert count.n == 2 * sum(isinstance(m, (Int8ConvBnAct, Int8Add)) for m in model.modules())


def test_regions_are_maximal_runs_with_two_primitives():
    """On a hand-made graph: a chain stops at a float node, needs two convs or adds, and leaves a trailing chunk
    (whose items lie outside) out."""
    conv = lambda: Int8ConvBnAct(torch.ones(4, 4, 1, 1, dtype=torch.int8), torch.ones(4), torch.zeros(4),  # noqa
                                 torch.nn.Conv2d(4, 4, 1), (0.1, 0), (0.1, 0), "swish")
    root = torch.nn.Module()
    for name in ("a", "b", "c", "d"):
        root.add_module(name, conv())
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_module("a", (x,))
    b = g.call_module("b", (a,))
    r = g.call_method("relu", (b,))  # a float op: the run ends
    c = g.call_module("c", (r,))
    d = g.call_module("d", (c,))
    ch = g.call_method("chunk", (d, 2, 1))
    g.output(g.call_function(operator.getitem, (g.call_function(torch.sigmoid, (ch,)), 0)))
    gm = fx.GraphModule(root, g)
    assert [[n.name for n in run] for run in ic.regions(gm)] == [["a", "b"], ["c", "d"]]
