"""Programmatic edges in a captured CUDA graph: each waiting kernel is scheduled before its producer ends.

Why: the decode step replays ~720 short kernels; with the ordinary edges that stream capture records,
a kernel's blocks are scheduled only once the previous kernel has fully completed, so every boundary
pays the next kernel's launch ramp. AOTInductor launches its kernels with plain cuLaunchKernel (no
PDL launch attribute), so the dependency type cannot come from the launches; instead the captured
graph is edited before it is instantiated: an edge A -> B between two kernel nodes becomes a
programmatic one when B is in kernels/pdl.py's waiting_kernel_names() (its first instruction is
griddepcontrol.wait, which holds it until A has completed and A's writes are visible). Every other
edge (into Inductor's or cuBLAS's kernels, memcpy and memset nodes) stays as captured.

Ports (CUgraphEdgeData.from_port): "programmatic" lets B launch once every block of A has exited (or
called griddepcontrol.launch_dependents); "launch" once every block of A has *started*, so B's blocks
can be resident and waiting while A's last blocks still run.

The graph API is the CUDA driver's (libcuda, through ctypes; CUDA 12.3+ for edge data and
cuFuncGetName): torch exposes the captured graph (CUDAGraph(keep_graph=True).raw_cuda_graph()) but
not its edges.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

log = logging.getLogger(__name__)

PORTS = {"programmatic": 1, "launch": 2}  # CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC, _LAUNCH_ORDER
PORT_MEANINGS = {"programmatic": "a waiting kernel launches once its producer's blocks have all exited",
                 "launch": "a waiting kernel launches once its producer's blocks have all started"}
_NODE_TYPE_KERNEL = 0  # CU_GRAPH_NODE_TYPE_KERNEL
_DEPENDENCY_PROGRAMMATIC = 1  # CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC


class _EdgeData(ctypes.Structure):
    """CUgraphEdgeData (8 bytes; reserved bytes must be zero)."""
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


class _KernelNodeParams(ctypes.Structure):
    """CUDA_KERNEL_NODE_PARAMS_v2: only func and kern are read."""
    _fields_ = [("func", ctypes.c_void_p), ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem_bytes", ctypes.c_uint), ("kernel_params", ctypes.c_void_p), ("extra", ctypes.c_void_p),
                ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


@dataclass(frozen=True)
class PdlPlan:
    """How a decode graph gets programmatic edges: the port, and the kernel names that wait first (the
    engine manifest's record of the kernels its packages embed, not this process's kernels/pdl.py)."""
    port: str
    waiting: frozenset[str]


@dataclass(frozen=True)
class PdlEdges:
    """What add_programmatic_edges changed: edges of the graph, kernel nodes, and edges made programmatic."""
    edges: int
    kernels: int
    converted: int
    waiting_kernels: int  # kernel nodes whose function is in the allow-list

    def __str__(self) -> str:
        return (f"{self.converted} of {self.edges} edges made programmatic ({self.waiting_kernels} of "
                f"{self.kernels} kernel nodes wait for their producer)")


class _Driver:
    """The few libcuda entry points the rewrite needs, resolved once."""

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        self.get_nodes = self._fn(lib, "cuGraphGetNodes")
        self.node_type = self._fn(lib, "cuGraphNodeGetType")
        self.kernel_params = self._fn(lib, "cuGraphKernelNodeGetParams_v2", "cuGraphKernelNodeGetParams")
        self.func_name = self._fn(lib, "cuFuncGetName")
        self.kernel_name = self._fn(lib, "cuKernelGetName", required=False)
        self.get_edges = self._fn(lib, "cuGraphGetEdges_v2")
        self.remove_edges = self._fn(lib, "cuGraphRemoveDependencies_v2")
        self.add_edges = self._fn(lib, "cuGraphAddDependencies_v2")

    @staticmethod
    def _fn(lib, *names: str, required: bool = True):
        for name in names:
            try:
                fn = getattr(lib, name)
            except AttributeError:
                continue
            fn.restype = ctypes.c_int
            return fn
        if required:
            raise OSError(f"libcuda has none of {names} (CUDA 12.3+ driver needed for programmatic graph edges)")
        return None


@functools.lru_cache(maxsize=1)
def _driver() -> _Driver:
    return _Driver()


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"cuda_graph_pdl: {what} failed with CUresult {result}")


def _nodes(drv: _Driver, graph: ctypes.c_void_p) -> list[int]:
    count = ctypes.c_size_t(0)
    _check(drv.get_nodes(graph, None, ctypes.byref(count)), "cuGraphGetNodes (count)")
    nodes = (ctypes.c_void_p * count.value)()
    _check(drv.get_nodes(graph, nodes, ctypes.byref(count)), "cuGraphGetNodes")
    return [n or 0 for n in nodes[:count.value]]


def _kernel_function_name(drv: _Driver, node: int) -> str | None:
    """The kernel node's function name, or None for another node type."""
    kind = ctypes.c_int(-1)
    _check(drv.node_type(ctypes.c_void_p(node), ctypes.byref(kind)), "cuGraphNodeGetType")
    if kind.value != _NODE_TYPE_KERNEL:
        return None
    params = _KernelNodeParams()
    _check(drv.kernel_params(ctypes.c_void_p(node), ctypes.byref(params)), "cuGraphKernelNodeGetParams")
    name = ctypes.c_char_p()
    if params.func:
        _check(drv.func_name(ctypes.byref(name), ctypes.c_void_p(params.func)), "cuFuncGetName")
    elif params.kern and drv.kernel_name is not None:
        _check(drv.kernel_name(ctypes.byref(name), ctypes.c_void_p(params.kern)), "cuKernelGetName")
    return (name.value or b"").decode(errors="replace")


def _edges(drv: _Driver, graph: ctypes.c_void_p):
    count = ctypes.c_size_t(0)
    _check(drv.get_edges(graph, None, None, None, ctypes.byref(count)), "cuGraphGetEdges (count)")
    n = count.value
    src, dst, data = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)(), (_EdgeData * n)()
    _check(drv.get_edges(graph, src, dst, data, ctypes.byref(count)), "cuGraphGetEdges")
    return [(src[i] or 0, dst[i] or 0, data[i]) for i in range(count.value)]


def kernel_names(graph_handle: int) -> list[str]:
    """The function names of the graph's kernel nodes (in the driver's node order): for reports and tests."""
    drv, graph = _driver(), ctypes.c_void_p(graph_handle)
    return [name for name in (_kernel_function_name(drv, n) for n in _nodes(drv, graph)) if name is not None]


def add_programmatic_edges(graph_handle: int, waiting: Iterable[str], port: str = "programmatic") -> PdlEdges:
    """Turn each default edge kernel A -> kernel B with B's function in `waiting` into a programmatic
    edge from A's `port` (PORTS). graph_handle: a CUgraph not yet instantiated
    (torch.cuda.CUDAGraph(keep_graph=True).raw_cuda_graph())."""
    if port not in PORTS:
        raise ValueError(f"cuda_graph_pdl: port={port!r} must be one of {sorted(PORTS)}")
    waiting = frozenset(waiting)
    drv, graph = _driver(), ctypes.c_void_p(graph_handle)
    names = {n: _kernel_function_name(drv, n) for n in _nodes(drv, graph)}
    edges = _edges(drv, graph)
    chosen = programmatic_candidates(names, edges, waiting)
    kernels = sum(name is not None for name in names.values())
    waiting_nodes = sum(waits(name, waiting) for name in names.values())
    if chosen:
        n = len(chosen)
        src = (ctypes.c_void_p * n)(*[a for a, _, _ in chosen])
        dst = (ctypes.c_void_p * n)(*[b for _, b, _ in chosen])
        old = (_EdgeData * n)(*[d for _, _, d in chosen])
        new = (_EdgeData * n)(*[_EdgeData(PORTS[port], 0, _DEPENDENCY_PROGRAMMATIC) for _ in range(n)])
        _check(drv.remove_edges(graph, src, dst, old, ctypes.c_size_t(n)), "cuGraphRemoveDependencies")
        added = drv.add_edges(graph, src, dst, new, ctypes.c_size_t(n))
        if added != 0:  # put the captured edges back: a graph missing them would race
            _check(drv.add_edges(graph, src, dst, old, ctypes.c_size_t(n)), "cuGraphAddDependencies (restore)")
            _check(added, "cuGraphAddDependencies")
    return PdlEdges(edges=len(edges), kernels=kernels, converted=len(chosen), waiting_kernels=waiting_nodes)


def capture_graph(record: Callable[[], Any], plan: PdlPlan | None) -> tuple[torch.cuda.CUDAGraph, Any, PdlEdges | None]:
    """Capture `record()` (warmed up by the caller) into a CUDA graph and, with a plan, make its edges into the
    waiting kernels programmatic before instantiating it: (graph, record's result, what the edit changed). If the
    edit fails the graph keeps its captured edges (add_programmatic_edges restores them) and says so in the log."""
    graph = torch.cuda.CUDAGraph(keep_graph=True) if plan else torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = record()
    edges = None
    if plan:
        try:
            edges = add_programmatic_edges(graph.raw_cuda_graph(), plan.waiting, plan.port)
        except (OSError, RuntimeError) as e:
            log.warning("cuda_graph_pdl: the graph runs without programmatic edges (%s)", e)
        graph.instantiate()
    return graph, result, edges


def waits(name: str | None, waiting: Iterable[str]) -> bool:
    """Whether kernel `name` is in the allow-list (exact names: engines/torch.py pdl_waiting_kernels)."""
    return name is not None and name in frozenset(waiting)


def programmatic_candidates(names: dict[int, str | None], edges: list[tuple[int, int, _EdgeData]],
                            waiting: Iterable[str]) -> list[tuple[int, int, _EdgeData]]:
    """The edges to make programmatic: default edges (full completion, ports 0) from a kernel node to a
    kernel node whose function waits first (`waits`). names: node -> kernel function name (None: not a kernel)."""
    waiting = frozenset(waiting)
    return [(a, b, d) for a, b, d in edges
            if names.get(a) is not None and waits(names.get(b), waiting)
            and d.type == 0 and d.from_port == 0 and d.to_port == 0]
