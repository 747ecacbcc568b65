"""Chains: stretches of the INT8 model that run in one native call.

Between its float ends an INT8 YOLO is a sequence of convolutions, residual adds, concats and channel splits on
uint8 channels-last maps. Each conv and add already runs a kept oneDNN primitive (:mod:`fxqat.native`), but every
call still costs Python around it: the module's checks, the output's allocation, ctypes. On a small model that is a
third of the time (yolov8n-cls at 224: 33 primitives take 1.0 ms of a 1.5 ms call).

:class:`Int8GraphModule` (what :func:`fxqat.convert` returns) keeps the flat graph that reports, summaries and
hooks see, and runs a *twin* of it in which each maximal stretch of such nodes is one :class:`NativeChain`. On its
first call at an input shape (and torch thread count) a chain runs its nodes as the flat graph would, which makes
their primitives, then records them as the steps of a ``fxqat_chain`` (qconv.cpp): primitives, and channel copies
for concat inputs and split halves, over buffers it keeps (reused once a value is dead). Later calls at that shape
run all steps in one C call. The results are the flat graph's, bit for bit: the same primitives on the same codes,
and copies.

A chain keeps its last four recordings (``NativeChain.MAX_PLANS``: each holds buffers and its shape's primitives).
It falls back to its nodes' own calls (so the flat graph's behaviour) when anything differs from what it
recorded: another shape or thread count (a new recording), a hook on one of its modules, a module whose primitive
changed, inputs that are not dense channels-last uint8, a conv that runs torch's op (split weights on CPUs without
VNNI, the direct path off: ``FXQAT_NATIVE=0`` or ``fxqat.native.ENABLED = False``). ``CHAINS = False`` turns chains
off (every node runs its own call, as before chains existed).
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn as nn

from .. import native
from ..graph.registry import op_kind
from .int8 import Int8Add, Int8ConvBnAct, _hooked, _hooked_globally

CHAINS = True  # False: every node makes its own call (one_call_per_node)
CL = torch.channels_last
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Int8GraphModule → (its code, twin | None)


@contextmanager
def one_call_per_node():
    """Within it, INT8 models run each node's own call, as before chains (``CHAINS = False``; the same outputs)."""
    global CHAINS
    saved, CHAINS = CHAINS, False
    try:
        yield
    finally:
        CHAINS = saved


def _dense_fn():
    from ..passes.int8_layout import _dense

    return _dense


def _step_kind(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """What a chain can run of ``n`` (conv | add | cat | chunk | item | dense), or None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if type(m) is Int8ConvBnAct and not m.float_out and not getattr(m, "quantize_input", False):
            return "conv"
        if type(m) is Int8Add and m.out is not None and len(n.args) == 2 and not n.kwargs:
            return "add"
        return None
    kind = op_kind(gm, n)
    if kind == "cat":
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        return "cat" if dim == 1 and isinstance(n.args[0], (list, tuple)) else None
    if kind == "split" and n.op == "call_method" and n.target == "chunk":
        return "chunk"
    if kind == "split" and n.target is operator.getitem and isinstance(n.args[1], int) and \
            isinstance(n.args[0], fx.Node) and _step_kind(gm, n.args[0]) == "chunk":
        return "item"
    if (n.op == "call_function" and n.target is _dense_fn() and len(n.args) == 1) or \
            (n.op == "call_method" and n.target == "contiguous" and n.kwargs.get("memory_format") is CL):
        return "dense"
    return None


def regions(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The maximal runs of consecutive chainable nodes (graph order is topological) with at least two convs or adds."""
    out, run = [], []
    for n in list(gm.graph.nodes) + [None]:
        if n is not None and _step_kind(gm, n) is not None:
            run.append(n)
            continue
        while run and _step_kind(gm, run[-1]) == "chunk":  # a trailing chunk's items lie outside: leave it out
            run.pop()
        if sum(_step_kind(gm, r) in ("conv", "add") for r in run) >= 2:
            out.append(run)
        run = []
    return out


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class NativeChain(nn.Module):
    """One stretch of the INT8 graph (``body``: its nodes, sharing the model's modules): one native call per input
    shape once recorded, else the nodes' own calls."""

    # recordings kept per chain, the most recently used first out last: each holds its buffers and its shape's
    # primitives, and validation with rectangular batches brings a new shape every few batches
    MAX_PLANS = 4

    def __init__(self, body: fx.GraphModule):
        super().__init__()
        self.body = body
        self._plans: OrderedDict = OrderedDict()

    def __call__(self, *xs):  # internal to the twin: no hooks of its own
        return self.forward(*xs)

    def forward(self, *xs):
        if CHAINS and native.ENABLED and all(type(x) is torch.Tensor for x in xs):
            key = (tuple(x.shape for x in xs), torch.get_num_threads())
            plan = self._plans.get(key, False)
            if plan and plan.ready(xs):
                self._plans.move_to_end(key)
                return plan.run(xs)
            if plan is False or (plan is not None and plan.stale()):
                outs, env = self._interpret(xs)
                self._plans[key] = _Plan.record(self.body, xs, env)
                self._plans.move_to_end(key)
                while len(self._plans) > self.MAX_PLANS:
                    self._plans.popitem(last=False)
                return outs
        return self.body.forward(*xs)

    def _interpret(self, xs) -> tuple[tuple, dict]:
        """The body's nodes run one by one (their modules' own calls, which make their primitives): the outputs and
        every node's value."""
        env, it = {}, iter(xs)
        load = lambda a: fx.node.map_arg(a, lambda n: env[n])  # noqa: E731
        for n in self.body.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(it)
            elif n.op == "call_module":
                env[n] = self.body.get_submodule(n.target)(*load(n.args), **load(n.kwargs))
            elif n.op == "call_function":
                env[n] = n.target(*load(n.args), **load(n.kwargs))
            elif n.op == "call_method":
                a = load(n.args)
                env[n] = getattr(a[0], n.target)(*a[1:], **load(n.kwargs))
            elif n.op == "output":
                return load(n.args[0]), env
        raise RuntimeError("chain body without output")

    def extra_repr(self):
        return f"{sum(n.op not in ('placeholder', 'output') for n in self.body.graph.nodes)} nodes"


class _Plan:
    """A recorded chain at one input shape: the native chain, the buffers it owns, the primitives it runs (kept
    alive here) and the module states it was recorded from."""

    def __init__(self):
        self.handle = None
        self.keep, self.watch, self.steps = [], [], 0  # primitives run (kept alive), (module, attr, state) recorded

    @classmethod
    def record(cls, body: fx.GraphModule, xs, env: dict) -> _Plan | None:
        """The plan for these inputs, from the values ``env`` the nodes just computed; None where some node did not
        run what a chain can run (then the nodes keep their own calls at this shape)."""
        lib = native.library()
        if lib is None:
            return None
        try:
            return cls()._build(lib, body, xs, env)
        except _NotChainable:
            return None

    def _build(self, lib, body: fx.GraphModule, xs, env: dict) -> _Plan:
        nodes = list(body.graph.nodes)
        ins = [n for n in nodes if n.op == "placeholder"]
        outs = list(nodes[-1].args[0])
        for x in xs:  # a strided input (a split half, a view) is made dense per call, as its readers would
            _need(x.dtype is torch.uint8 and x.dim() == 4 and x.device.type == "cpu")
        _need(len(set(outs)) == len(outs) and not set(outs) & set(ins))
        reads = {n: _reads(body, n) for n in nodes}
        last = {}  # node → index of its last reader
        for i, n in enumerate(nodes):
            for a in reads[n]:
                last[a] = i
        slot = {n: i for i, n in enumerate(ins)}
        slot.update({n: len(ins) + j for j, n in enumerate(outs)})
        self.out_specs = []
        for n in outs:
            v = env[n]
            _need(type(v) is torch.Tensor and v.dtype is torch.uint8 and v.dim() == 4)
            self.out_specs.append((tuple(v.shape), _cl_strides(v.shape)))
        n_ext = len(ins) + len(outs)
        buffers, free, owned = [], {}, {}  # owned buffers (slot n_ext + i); nbytes → free slots; value → its slot

        def new_slot(n) -> int:
            if n in slot:
                return slot[n]
            nbytes = env[n].numel()
            s = free[nbytes].pop() if free.get(nbytes) else None
            if s is None:
                buffers.append(torch.empty(nbytes, dtype=torch.uint8))
                s = n_ext + len(buffers) - 1
            slot[n] = owned[n] = s
            return s

        steps = []
        for i, n in enumerate(nodes):
            kind = _step_kind(body, n) if n.op not in ("placeholder", "output") else None
            if kind is None or kind == "chunk":
                _need(n.op in ("placeholder", "output") or kind == "chunk")
                continue
            v = env[n]
            _need(type(v) is torch.Tensor and v.dtype is torch.uint8 and v.dim() == 4)
            if kind == "conv":
                m = body.get_submodule(n.target)
                p = m._packed
                _need(p is not None and p[3] is not None and p[0] == tuple(env[n.args[0]].shape))
                steps.append(("prim", p[3].handle, slot[n.args[0]], -1, new_slot(n)))
                self.keep.append(p[3])
                self.watch.append((m, "_packed", p))
            elif kind == "add":
                m = body.get_submodule(n.target)
                p = m._prim
                a, b = n.args
                _need(p is not None and p[1] is not None and tuple(env[a].shape) == tuple(p[0]) ==
                      tuple(env[b].shape))
                steps.append(("prim", p[1].handle, slot[a], slot[b], new_slot(n)))
                self.keep.append(p[1])
                self.watch.append((m, "_prim", p))
            elif kind == "cat":
                dst, off, pixels = new_slot(n), 0, _pixels(v)
                for a in n.args[0]:
                    c = env[a].shape[1]
                    _need(_pixels(env[a]) == pixels)
                    steps.append(("copy", slot[a], c, 0, dst, v.shape[1], off, c, pixels))
                    off += c
                _need(off == v.shape[1])
            elif kind == "item":
                (src,) = reads[n]
                parts = torch.empty(env[src].shape[1], dtype=torch.bool).chunk(_chunks(n.args[0]))
                off = sum(t.numel() for t in parts[:n.args[1]])
                _need(v.shape[1] == parts[n.args[1]].numel() and _pixels(env[src]) == _pixels(v))
                steps.append(("copy", slot[src], env[src].shape[1], off, new_slot(n), v.shape[1], 0, v.shape[1],
                              _pixels(v)))
            else:  # dense: every buffer here is dense already
                (a,) = n.args
                if n in slot:  # an output: its own buffer
                    steps.append(("copy", slot[a], v.shape[1], 0, slot[n], v.shape[1], 0, v.shape[1], _pixels(v)))
                else:
                    slot[n] = slot[a]
                    if a in owned:  # the buffer lives on as n's
                        owned[n] = owned.pop(a)
                        last[n] = max(last.get(n, i), last.get(a, i))
            for a in reads[n] + [n]:  # values dead after this node: their buffers are free again
                if a in owned and last.get(a, i) <= i:
                    s = owned.pop(a)
                    free.setdefault(buffers[s - n_ext].numel(), []).append(s)
        threads = torch.get_num_threads()
        self._lib = lib
        self.handle = chain = lib.fxqat_chain_create(n_ext + len(buffers), n_ext, threads)
        for j, b in enumerate(buffers):
            lib.fxqat_chain_slot(chain, n_ext + j, b.data_ptr())
        for st in steps:
            if st[0] == "prim":
                lib.fxqat_chain_prim(chain, *st[1:])
            else:
                lib.fxqat_chain_copy(chain, *st[1:])
        self.buffers, self.steps, self.threads = buffers, len(steps), threads
        self._ext_type = ctypes.c_void_p * n_ext
        self._run = lib.fxqat_chain_run
        return self

    def stale(self) -> bool:
        """Whether a module's primitive changed since recording (moved, re-made): record again."""
        return any(getattr(m, attr) is not p for m, attr, p in self.watch)

    def ready(self, xs) -> bool:
        """Whether this call may run the chain: uint8 inputs on the CPU, no hooks, the same primitives."""
        for x in xs:
            if x.dtype is not torch.uint8 or x.device.type != "cpu":
                return False
        for m, attr, p in self.watch:
            if getattr(m, attr) is not p or m._forward_hooks or m._forward_pre_hooks:
                return False
        return not _hooked_globally()

    def run(self, xs) -> tuple:
        xs = [x if x.is_contiguous(memory_format=CL) else x.contiguous(memory_format=CL) for x in xs]
        outs = tuple(torch.empty_strided(s, st, dtype=torch.uint8) for s, st in self.out_specs)
        # a new pointer array per call: two Python threads may fill one between their calls (each call itself runs
        # with the GIL held, so the chain's own buffers are never shared by two running calls)
        ext = self._ext_type(*(x.data_ptr() for x in xs), *(o.data_ptr() for o in outs))
        if self._run(self.handle, ext):
            raise RuntimeError(f"oneDNN chain failed: {self._lib.fxqat_qconv_error().decode()}")
        return outs

    def __del__(self):
        if getattr(self, "handle", None):
            self._lib.fxqat_chain_destroy(self.handle)
            self.handle = None


class _NotChainable(Exception):
    pass


def _need(ok: bool) -> None:
    if not ok:
        raise _NotChainable


def _pixels(v: torch.Tensor) -> int:
    return v.shape[0] * v.shape[2] * v.shape[3]


def _cl_strides(shape) -> tuple:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def _chunks(chunk: fx.Node) -> int:
    """``x.chunk(k, 1)``'s k (a chain splits channels only)."""
    args = dict(zip(("self", "chunks", "dim"), chunk.args), **chunk.kwargs)
    _need(args.get("dim", 0) == 1 and isinstance(args.get("chunks"), int))
    return args["chunks"]


def _reads(body: fx.GraphModule, n: fx.Node) -> list[fx.Node]:
    """The values a step reads: a chunk's item reads the chunked map (the chunk itself is no step)."""
    if n.op not in ("placeholder", "output") and _step_kind(body, n) == "item":
        return [n.args[0].args[0]]
    if n.op not in ("placeholder", "output") and _step_kind(body, n) == "chunk":
        return []
    return list(n.all_input_nodes)


def _body(gm: fx.GraphModule, run: list[fx.Node], ins: list[fx.Node], outs: list[fx.Node]) -> fx.GraphModule:
    """The nodes of ``run`` as a GraphModule of their own: ``ins`` in, the tuple of ``outs`` out (``gm``'s modules)."""
    g, env, root = fx.Graph(), {}, {}
    for a in ins:
        env[a] = g.placeholder(a.name)
    for r in run:
        env[r] = g.node_copy(r, env.__getitem__)
        if r.op == "call_module":
            root[r.target] = _fetch(gm, r.target)
    g.output(tuple(env[o] for o in outs))
    return fx.GraphModule(root, g)


def twin(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A GraphModule computing what ``gm`` computes, each of its :func:`regions` one :class:`NativeChain` call
    (sharing ``gm``'s modules); None where there is none."""
    found = regions(gm)
    if not found:
        return None
    start = {run[0]: k for k, run in enumerate(found)}
    inside = {n for run in found for n in run}
    g, env, root = fx.Graph(), {}, {}
    for n in gm.graph.nodes:
        if n not in inside:
            env[n] = g.node_copy(n, env.__getitem__)
            if n.op in ("call_module", "get_attr"):
                root[n.target] = _fetch(gm, n.target)
        elif n in start:
            k = start[n]
            run, members = found[k], set(found[k])
            ins = list(dict.fromkeys(a for r in run for a in r.all_input_nodes if a not in members))
            outs = [r for r in run if any(u not in members for u in r.users)]
            root[f"fxqat_chain_{k}"] = NativeChain(_body(gm, run, ins, outs))
            call = g.call_module(f"fxqat_chain_{k}", tuple(env[a] for a in ins))
            for j, o in enumerate(outs):
                env[o] = g.call_function(operator.getitem, (call, j))
    return fx.GraphModule(root, g)


class Int8GraphModule(fx.GraphModule):
    """The INT8 GraphModule :func:`fxqat.convert` returns: its graph is the flat one (reports, summaries, hooks);
    a call runs its :func:`twin`, where stretches of convs, adds, concats and splits are one native call each (see
    the module docstring). A copy made by pickling is a plain GraphModule: the same results, one call per node."""

    def __call__(self, *args, **kwargs):
        if CHAINS and native.ENABLED and not kwargs and all(type(a) is torch.Tensor for a in args) and \
                not _hooked(self):
            state = _TWINS.get(self)
            if state is None or state[0] is not self._code:
                state = (self._code, twin(self) if native.library() is not None else None)
                _TWINS[self] = state
            if state[1] is not None:
                return state[1].forward(*args)
        return super().__call__(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        _TWINS.pop(self, None)
        return super()._apply(fn, *args, **kwargs)
