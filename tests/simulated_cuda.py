"""A simulated CUDA device for the tests: CUDA's device, dtype and host-sync rules on a CPU.

Inside ``with SimulatedCuda() as sim:`` a tensor created on (or moved to) ``cuda`` is a
:class:`SimTensor`: a wrapper whose device is ``cuda:0`` for every dispatch decision — so
CUDA's own autocast kernels (``AutocastCUDA``) apply to it under ``torch.autocast("cuda")`` —
and whose values live in a CPU "shadow" tensor on which every op really runs (so routing,
masking and every data-dependent shape get real values). Each op is checked as CUDA would:

- device: CUDA tensors mix only with 0-dim CPU tensors (and CPU indices into a CUDA tensor);
  anything else raises the error a GPU run would raise;
- host syncs: every op that makes the host wait for the device on a real GPU — reading a value
  (``item``, ``bool``, ``tolist``), data-dependent output sizes (``nonzero``, boolean masks,
  ``bincount``, ``unique``, ``repeat_interleave`` without ``output_size``), device-to-host copies,
  host-to-device copies that are not ``non_blocking`` from pinned memory, and ``_grouped_mm``
  off its fast path — is recorded in :attr:`SimulatedCuda.syncs` with the line that caused it;
- ``torch._grouped_mm``: each call is checked against the rules of the CUDA kernel (torch's
  ``ATen/native/GroupedMMUtils.h``): both operands of one dtype, bf16 for the fast grouped kernel
  (anything else takes a fallback that copies the offsets to the host), int32 offsets, strides
  and data pointers aligned to 16 bytes; violations go to :attr:`SimulatedCuda.errors`;
- fp32 regions: code that must run in fp32 under autocast (routers, MoT mixing weights, visual
  targets, the losses) is marked with :meth:`SimulatedCuda.fp32_region`; a reduced-precision
  floating op inside one is an error.

Autograd: torch's C++ autograd engine runs CUDA work on per-device threads and asks the CUDA
runtime for streams, which fails without a GPU. So gradients are computed on the shadows: every
op also records itself in an ordinary CPU autograd graph of the shadow tensors, ``backward``
on a SimTensor runs that graph, and a leaf's shadow gradient is handed to the SimTensor's
``.grad`` (accumulating, as autograd does). Custom ``autograd.Function`` s run their forward on
the SimTensors and are bridged into the shadow graph, so their backward also runs on
SimTensors and is checked. (Backward kernels of built-in ops run on the shadows only; their
device and dtype follow from the checked forward.)

Only one SimulatedCuda may be active at a time; it patches ``torch.cuda``'s availability
queries and ``pin_memory`` while active and restores them after. Two settings outlast it: CUDA
tensors keep torch's no-op device guard and CUDA counts as initialised, so a process that
used it cannot use a real GPU afterwards (the test suite never does).
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["SimTensor", "SimulatedCuda", "Sync"]

CUDA = torch.device("cuda", 0)
_PROJECT = Path(__file__).resolve().parents[1]
_aten = torch.ops.aten

# Ops whose output size depends on values, so a GPU must finish before the host can go on.
_DATA_DEPENDENT = {_aten.nonzero.default, _aten.masked_select.default, _aten.bincount.default,
                   _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
                   _aten.equal.default, _aten.is_nonzero.default, _aten._local_scalar_dense.default}
_COPIES = {_aten._to_copy.default, _aten.copy_.default, _aten._copy_from.default,
           _aten._copy_from_and_resize.default}
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
             _aten._index_put_impl_.default}
_REDUCED = (torch.bfloat16, torch.float16)


@dataclass
class Sync:
    """One host sync: the op and the innermost project line that issued it."""

    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.op} at {self.where}"


class SimTensor(torch.Tensor):
    """A tensor that is on ``cuda:0`` to the dispatcher, with its values in a CPU ``shadow``."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    shadow: torch.Tensor

    @staticmethod
    def __new__(cls, shadow: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(
            cls, shadow.shape, strides=shadow.stride(), storage_offset=shadow.storage_offset(), dtype=shadow.dtype,
            layout=shadow.layout, device=CUDA, requires_grad=False)
        t.shadow = shadow
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if SimulatedCuda.active is None:
            raise RuntimeError(f"a simulated CUDA tensor reached {func} outside its SimulatedCuda block")
        return SimulatedCuda.active.__torch_dispatch__(func, types, args, kwargs)

    # Storage identity, for code that finds tensors sharing memory (tied weights in checkpoints).
    def untyped_storage(self):
        return self.shadow.untyped_storage()

    def data_ptr(self) -> int:
        return self.shadow.data_ptr()

    def __reduce_ex__(self, protocol):
        # torch.save of a CUDA tensor, loaded with map_location="cpu": its values on the CPU
        return self.shadow.detach().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return f"SimTensor(cuda, {self.dtype}, {tuple(self.shape)})"


_LIBRARY = tuple(_PROJECT / name for name in ("multimodal_moe", "data_pipelines", "eval_tasks", "benchmarks"))


def _where() -> str:
    """The innermost frame of this project's library code on the stack."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if any(root in path.parents for root in _LIBRARY):
            return f"{path.relative_to(_PROJECT)}:{frame.lineno} ({frame.name})"
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != Path(__file__).resolve() and "site-packages" not in path.parts:
            return f"{path.name}:{frame.lineno} ({frame.name})"
    return "<unknown>"


def _is_pinned(t: torch.Tensor) -> bool:
    return getattr(t, "_simulated_pinned", False)


class SimulatedCuda(TorchDispatchMode):
    """The simulated device; see the module docstring.

    Attributes:
        syncs: host syncs since the last :meth:`reset`.
        errors: ``_grouped_mm`` and fp32-region violations since the last :meth:`reset`.
        grouped_mm: one dict per ``_grouped_mm`` call (dtypes, shapes) since the last :meth:`reset`.
    """

    active: SimulatedCuda | None = None

    def __init__(self, capability: tuple[int, int] = (9, 0)):
        """``capability``: the simulated GPU's compute capability (9.0: an H100)."""
        super().__init__()
        self.capability = capability
        self._cuda_rng = torch.Generator().manual_seed(0).get_state()
        self.syncs: list[Sync] = []
        self.errors: list[str] = []
        self.grouped_mm: list[dict] = []
        self._fp32_regions: list[str] = []
        self._stack = contextlib.ExitStack()

    # The GPU's generator: random ops on CUDA tensors draw from it, not from the CPU's.
    def _manual_seed(self, seed: int) -> None:
        self._cuda_rng = torch.Generator().manual_seed(int(seed)).get_state()

    def _get_rng_state(self, device="cuda") -> torch.Tensor:
        return self._cuda_rng.clone()

    def _set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise TypeError(f"set_rng_state takes a ByteTensor, got {type(state).__name__}")
        self._cuda_rng = state.clone()

    def _synchronize(self, *args) -> None:
        self.syncs.append(Sync("torch.cuda.synchronize", _where()))

    def reset(self) -> None:
        self.syncs, self.errors, self.grouped_mm = [], [], []

    # -- entering and leaving -------------------------------------------------------------------

    def __enter__(self) -> SimulatedCuda:
        if SimulatedCuda.active is not None:
            raise RuntimeError("a SimulatedCuda is already active")
        # CUDA tensors get a no-op device guard (torch's own for machines without CUDA); what the
        # autograd engine needs of a device is avoided by differentiating the shadows instead.
        torch._C._ensureCUDADeviceGuardSet()
        # Shadow ops run with the dispatch keys of the code outside, so they record autograd.
        self._tls = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
        patch = self._stack.enter_context(_Patcher())
        cuda = torch.cuda
        for name, value in {"is_available": lambda: True, "is_bf16_supported": lambda *a, **k: True,
                            "device_count": lambda: 1, "current_device": lambda: 0, "set_device": lambda d: None,
                            "synchronize": self._synchronize, "get_device_capability": lambda *a: self.capability,
                            "get_rng_state": self._get_rng_state, "set_rng_state": self._set_rng_state,
                            "get_rng_state_all": lambda: [self._get_rng_state()],
                            "set_rng_state_all": lambda states: self._set_rng_state(*states),
                            "manual_seed": self._manual_seed, "manual_seed_all": self._manual_seed,
                            "_lazy_init": lambda: None}.items():
            patch(cuda, name, value)
        patch(torch.accelerator, "is_available", lambda: True)
        # torch.tensor(data, device="cuda") makes a CPU tensor and moves it through the dispatcher
        previous_lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        self._stack.callback(torch._C._set_only_lift_cpu_tensors, previous_lift)
        # module.to("cuda") must give new Parameters holding SimTensors, not CPU ones pointed at them
        previous = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        self._stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, previous)
        patch(torch.nn.Module, "_apply", _keeping_ties(torch.nn.Module._apply))
        patch(torch.Tensor, "pin_memory", _fake_pin_memory)
        patch(torch.Tensor, "is_pinned", _is_pinned)
        patch(torch.Tensor, "tolist", _host_read(torch.Tensor.tolist, self))
        patch(torch.Tensor, "numpy", _host_read(torch.Tensor.numpy, self))
        patch(torch.autograd, "backward", _shadow_backward(torch.autograd.backward))
        patch(torch.autograd, "grad", _shadow_grad(torch.autograd.grad))
        patch(torch.autograd.Function, "apply", classmethod(_bridged_apply(torch.autograd.Function.__dict__["apply"])))
        SimulatedCuda.active = self
        self._stack.callback(setattr, SimulatedCuda, "active", None)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._stack.close()
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def fp32_region(self, what: str):
        """A block that must compute in fp32 under autocast (see the module docstring)."""
        self._fp32_regions.append(what)
        try:
            yield
        finally:
            self._fp32_regions.pop()

    # -- the op-by-op simulation ------------------------------------------------------------

    @contextlib.contextmanager
    def _cuda_generator(self, func):
        """A random op on the GPU draws from the GPU's generator (swapped into the CPU's)."""
        if torch.Tag.nondeterministic_seeded not in func.tags:
            yield
            return
        cpu = torch.get_rng_state()
        torch.set_rng_state(self._cuda_rng)
        try:
            yield
        finally:
            self._cuda_rng = torch.get_rng_state()
            torch.set_rng_state(cpu)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        sims = [t for t in tensors if isinstance(t, SimTensor)]
        target = kwargs.get("device")
        to_cuda = target is not None and torch.device(target).type == "cuda"
        if not sims and not to_cuda:
            if any(t.device.type == "cuda" for t in tensors):
                raise RuntimeError(f"{func} got a CUDA tensor that is not simulated (made outside the block?)")
            return func(*args, **kwargs)  # CPU work, or the shadows' own backward

        self._check_devices(func, args, tensors)
        self._count_syncs(func, args, kwargs, sims, to_cuda, tensors)
        if func is _aten._grouped_mm.default:
            self._check_grouped_mm(args, kwargs)
        if self._fp32_regions and func not in _COPIES and any(t.dtype in _REDUCED for t in tensors):
            self.errors.append(f"{func} on {[t.dtype for t in tensors]} inside the fp32 region "
                               f"'{self._fp32_regions[-1]}' at {_where()}")

        grad = torch.is_grad_enabled()
        for t in sims:
            if grad and t.requires_grad and t.is_leaf:
                _track_leaf(t)
        shadow_args, shadow_kwargs = tree_map(_unwrap, (args, kwargs))
        if to_cuda:
            shadow_kwargs["device"] = torch.device("cpu")
            shadow_kwargs.pop("pin_memory", None)
        with torch._C._ForceDispatchKeyGuard(*self._tls), self._cuda_generator(func):
            out = func(*shadow_args, **shadow_kwargs)

        by_shadow = {id(t.shadow): t for t in sims}
        cpu_result = target is not None and torch.device(target).type == "cpu"
        if func is _aten.copy_.default:
            return args[0]

        def wrap(o):
            if not isinstance(o, torch.Tensor):
                return o
            if id(o) in by_shadow:  # in place, or out=
                return by_shadow[id(o)]
            return o if cpu_result else SimTensor(o)

        out = tree_map(wrap, out)
        if self._fp32_regions:
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            if any(o.dtype in _REDUCED for o in outs):
                self.errors.append(f"{func} gave {[o.dtype for o in outs]} inside the fp32 region "
                                   f"'{self._fp32_regions[-1]}' at {_where()}")
        return out

    def _check_devices(self, func, args, tensors) -> None:
        if func in _COPIES:
            return
        if func in _INDEXING:
            self_t = args[0]
            if not isinstance(self_t, SimTensor) and any(isinstance(t, SimTensor) for t in tensors):
                raise RuntimeError(f"indices should be either on cpu or on the same device as the indexed tensor "
                                   f"(cpu) ({func} at {_where()})")
            return  # CPU indices into a CUDA tensor are copied over (counted as a sync)
        cpu = [t for t in tensors if not isinstance(t, SimTensor) and t.dim() > 0]
        if cpu:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! ({func} on a CPU tensor of shape {tuple(cpu[0].shape)}, "
                               f"at {_where()})")

    def _count_syncs(self, func, args, kwargs, sims, to_cuda, tensors) -> None:
        name = None
        if func in _DATA_DEPENDENT:
            name = str(func)
        elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            name = "repeat_interleave without output_size"
        elif func in _INDEXING:
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                name = f"{func} with a boolean mask"
            elif any(isinstance(i, torch.Tensor) and not isinstance(i, SimTensor) for i in indices):
                name = f"{func} with CPU indices"
        elif func in _COPIES:
            src = args[1] if func is _aten.copy_.default else args[0]
            if func is _aten.copy_.default:
                dst_cuda = isinstance(args[0], SimTensor)
            else:  # no device given: a dtype or layout change on the source's device
                dst_cuda = to_cuda or (kwargs.get("device") is None and isinstance(src, SimTensor))
            if isinstance(src, SimTensor) and not dst_cuda:
                name = "device-to-host copy"
            elif not isinstance(src, SimTensor) and dst_cuda:
                blocking = not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2])
                if blocking or not _is_pinned(src):
                    name = "blocking host-to-device copy" + ("" if _is_pinned(src) else " from pageable memory")
        elif func is _aten._grouped_mm.default and not _grouped_mm_fast(args[0], args[1]):
            name = "_grouped_mm fallback (offsets copied to the host)"
        if name is not None:
            self.syncs.append(Sync(name, _where()))

    def _check_grouped_mm(self, args, kwargs) -> None:
        a, b = args[0], args[1]
        offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
        call = {"a": (a.dtype, tuple(a.shape)), "b": (b.dtype, tuple(b.shape)),
                "offs": None if offs is None else offs.dtype, "where": _where()}
        self.grouped_mm.append(call)
        problems = []
        if a.dtype != b.dtype:
            problems.append(f"operands of different dtypes {a.dtype} and {b.dtype} (the CUDA fallback fails)")
        if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
            problems.append(f"{a.dtype} x {b.dtype}: only bf16 takes the grouped kernel")
        if offs is not None and (offs.dtype != torch.int32 or offs.dim() != 1):
            problems.append(f"offsets must be 1-D int32, got {offs.dtype} {tuple(offs.shape)}")
        for name, t in (("mat_a", a), ("mat_b", b)):
            if not _aligned(t):
                problems.append(f"{name} strides {t.stride()} / offset {t.storage_offset()} not 16-byte aligned")
        if problems:
            self.errors.append(f"_grouped_mm at {call['where']}: " + "; ".join(problems))


def _aligned(t: torch.Tensor) -> bool:
    step = 16 // t.element_size()
    s = t.stride()
    inner_ok = (s[-1] == 1 and s[-2] % step == 0) or (s[-2] == 1 and s[-1] % step == 0)
    return inner_ok and t.storage_offset() % step == 0


def _grouped_mm_fast(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.bfloat16


def _unwrap(t):
    return t.shadow if isinstance(t, SimTensor) else t


def _host_read(original, sim: SimulatedCuda):
    """``Tensor.tolist`` / ``numpy``, which refuse tensor subclasses: read the shadow, count a sync."""

    @functools.wraps(original)
    def read(self, *args, **kwargs):
        if not isinstance(self, SimTensor):
            return original(self, *args, **kwargs)
        if self.device.type == "cuda" and original is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        sim.syncs.append(Sync(f"Tensor.{original.__name__}", _where()))
        return original(self.shadow.detach(), *args, **kwargs)
    return read


def _keeping_ties(original):
    """``Module._apply`` that keeps a Parameter shared by several modules (tied weights) one
    Parameter, as CUDA's in-place conversion does; new Parameters would untie them."""

    def _apply(self, fn, recurse=True):
        slots = [(m, name, id(p)) for m in self.modules() for name, p in m._parameters.items() if p is not None]
        out = original(self, fn, recurse)
        first = {}
        for module, name, key in slots:
            module._parameters[name] = first.setdefault(key, module._parameters[name])
        return out
    return _apply


def _fake_pin_memory(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if isinstance(self, SimTensor):
        raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be pinned")
    self._simulated_pinned = True
    return self


def _track_leaf(t: SimTensor) -> None:
    """Make a leaf's shadow require grad, and hand its gradients to the SimTensor's ``.grad``."""
    shadow = t.shadow
    if shadow.requires_grad:
        return
    shadow.requires_grad_(True)
    ref = weakref.ref(t)

    def hand_over(s: torch.Tensor) -> None:
        g, s.grad = s.grad, None
        leaf = ref()
        if leaf is None:
            return
        with torch.no_grad():
            if leaf.grad is None:
                leaf.grad = SimTensor(g)
            else:
                leaf.grad.add_(SimTensor(g))

    shadow.register_post_accumulate_grad_hook(hand_over)


def _shadows(tensors) -> tuple[list, bool]:
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors or [])
    return [_unwrap(t) for t in items], any(isinstance(t, SimTensor) for t in items)


def _shadow_backward(original):
    @functools.wraps(original)
    def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None,
                 inputs=None):
        shadows, simulated = _shadows(tensors)
        if not simulated:
            return original(tensors, grad_tensors, retain_graph, create_graph, inputs=inputs)
        if inputs is not None:
            raise NotImplementedError("backward(inputs=...) is not simulated")
        grads = None if grad_tensors is None else _shadows(grad_tensors)[0]
        return original(shadows, grads, retain_graph, create_graph)
    return backward


def _shadow_grad(original):
    @functools.wraps(original)
    def grad(outputs, inputs, grad_outputs=None, **kwargs):
        outs, simulated = _shadows(outputs)
        if not simulated:
            return original(outputs, inputs, grad_outputs, **kwargs)
        ins = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        for t in ins:
            if isinstance(t, SimTensor) and t.is_leaf:
                _track_leaf(t)
        gouts = None if grad_outputs is None else _shadows(grad_outputs)[0]
        result = original(outs, [_unwrap(t) for t in ins], gouts, **kwargs)
        return tuple(None if g is None else SimTensor(g) for g in result)
    return grad


class _Bridge(torch.autograd.Function):
    """Joins a custom Function, run on SimTensors, to the shadow graph: forward passes the
    outputs' shadows on; backward calls the custom Function's backward on SimTensors."""

    @staticmethod
    def forward(ctx, node, num_inputs, *shadows):
        ctx.node, ctx.num_inputs = node, num_inputs
        return tuple(s.clone() for s in shadows[num_inputs:])

    @staticmethod
    def backward(ctx, *grads):
        grads_in = ctx.node(*[SimTensor(g) for g in grads])
        grads_in = grads_in if isinstance(grads_in, tuple) else (grads_in,)
        out = [None if g is None else _unwrap(g) for g in grads_in]
        return (None, None, *out, *[None] * len(grads))


def _bridged_apply(original):
    """``Function.apply`` that runs a custom Function on SimTensors and bridges it into the
    shadow graph (``original``: the unbound ``apply`` descriptor)."""

    def apply(cls, *args, **kwargs):
        sims = [a for a in args if isinstance(a, SimTensor)]
        if cls is _Bridge or not sims:
            return original.__get__(None, cls)(*args, **kwargs)
        grad = torch.is_grad_enabled()
        for t in sims:
            if grad and t.requires_grad and t.is_leaf:
                _track_leaf(t)
        out = original.__get__(None, cls)(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        if not grad or not any(isinstance(o, SimTensor) and o.grad_fn is not None for o in outs):
            return out
        node = next(o.grad_fn for o in outs if isinstance(o, SimTensor) and o.grad_fn is not None)
        tensor_args = [a for a in args if isinstance(a, torch.Tensor)]
        inputs = [_unwrap(a) for a in tensor_args]
        results = [o for o in outs if isinstance(o, SimTensor)]
        bridged = _Bridge.apply(functools.partial(_call_node, node, len(tensor_args), args), len(inputs), *inputs,
                                *[r.shadow for r in results])
        for r, s in zip(results, bridged):
            r.shadow = s
        return out
    return apply


def _call_node(node, num_tensor_args, args, *grads):
    """Run a custom Function's backward (its autograd node) on SimTensor gradients; returns
    one gradient per tensor argument of its ``apply``."""
    grads_all = node.apply(*grads)
    grads_all = grads_all if isinstance(grads_all, tuple) else (grads_all,)
    return tuple(g for a, g in zip(args, grads_all) if isinstance(a, torch.Tensor))[:num_tensor_args]


class _Patcher:
    """Sets attributes for the duration of a ``with`` block."""

    def __enter__(self):
        self.saved = []
        return self

    def __call__(self, owner, name, value) -> None:
        self.saved.append((owner, name, owner.__dict__.get(name, getattr(owner, name))))
        setattr(owner, name, value)

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)
