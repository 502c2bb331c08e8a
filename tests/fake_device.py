"""An emulated device array library: cupy's rules, numpy's arithmetic, on the CPU.

The suite proves the device path without a GPU by running the jobs on this stand-in
(installed with :func:`pipeline.backend.set_device`). It is a duck array, not an ndarray
subclass, and enforces what makes code that works on numpy fail on cupy:

* ``np.asarray(x)`` (any implicit conversion to numpy) raises cupy's ``TypeError``;
* numpy arrays mixed into its arithmetic or its functions raise (numpy scalars and Python
  numbers are fine, as in cupy); ``xp.asarray(host)`` is the one way in;
* ``.get()`` (and ``float``/``int``/``bool``/``item``, which cupy allows as implicit
  synchronising reads) are the only ways back to the host;
* reductions return 0-d device arrays, as cupy's do; there is no ``xp.random``.

:data:`STATS` counts device arrays created, host-to-device copies and host syncs.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.backend import Device

IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
    "NumPy array explicitly."
)


class Stats:
    """Thread-safe counters of what the emulated device did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.arrays = 0  # device arrays created
            self.transfers = 0  # host → device copies (xp.asarray of a numpy array)
            self.transferred_bytes = 0
            self.syncs = 0  # device → host reads (.get, float, bool, int, item)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)


STATS = Stats()

# Types of the blocks that spied kernels received, by kernel name (tests.test_device). A
# module global: distributed pickles task functions even on a threaded cluster, and a
# spy's closure would be copied, while this module is pickled by reference.
KERNEL_BLOCKS: dict[str, list[str]] = {}
_kernel_lock = threading.Lock()


def record_kernel(name: str, block: Any) -> None:
    """Note that kernel ``name`` received ``block``."""
    with _kernel_lock:
        KERNEL_BLOCKS.setdefault(name, []).append(type(block).__name__)


class FakeDeviceArray:
    """A device array: holds a numpy array it never hands out implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100  # numpy defers its operators to ours, then we refuse

    def __init__(self, a: np.ndarray) -> None:
        self._a = a
        STATS.add("arrays")

    # -- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    T = property(lambda self: _wrap(self._a.T))

    def __repr__(self) -> str:
        return f"FakeDeviceArray(shape={self.shape}, dtype={self.dtype})"

    # -- the ways back to the host
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(IMPLICIT)

    def get(self) -> np.ndarray:
        STATS.add("syncs")
        return self._a.copy()

    def _scalar(self, kind: Callable[[Any], Any]) -> Any:
        if self._a.size != 1:
            raise TypeError("only size-1 arrays can be converted to Python scalars")
        STATS.add("syncs")
        return kind(self._a.reshape(()))

    def __float__(self) -> float:
        return self._scalar(float)

    def __int__(self) -> int:
        return self._scalar(int)

    def __index__(self) -> int:
        return self._scalar(operator.index)

    def __bool__(self) -> bool:
        return self._scalar(bool)

    def item(self) -> Any:
        return self._scalar(lambda v: v.item())

    def tolist(self) -> Any:
        STATS.add("syncs")
        return self._a.tolist()

    # -- containers
    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Any:
        return (_wrap(row) for row in self._a)

    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._a[_unwrap(key)] = _unwrap(value)

    # -- methods (numpy's, on device data)
    def __getattr__(self, name: str) -> Any:
        if name in _METHODS:
            method = getattr(self._a, name)
            return lambda *args, **kwargs: _call(method, args, kwargs)
        raise AttributeError(f"FakeDeviceArray has no attribute {name!r}")

    # -- numpy protocols (cupy implements both)
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return _call(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func in (np.asarray, np.array, np.asanyarray, np.ascontiguousarray):
            raise TypeError(IMPLICIT)
        return _call(func, args, kwargs)


_METHODS = {
    "astype", "copy", "reshape", "ravel", "transpose", "sum", "min", "max", "mean",
    "any", "all", "dot", "conj", "fill", "view", "squeeze", "argmax", "argmin", "clip",
    "diagonal", "trace", "cumsum", "nonzero", "flatten",
}  # fmt: skip


def _binary(op: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[..., Any]:
    def method(self: FakeDeviceArray, other: Any) -> Any:
        args = (other, self) if reflected else (self, other)
        return _call(op, args, {})

    return method


def _inplace(op: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def method(self: FakeDeviceArray, other: Any) -> FakeDeviceArray:
        _check_operand(other)
        op(self._a, _unwrap(other))
        return self

    return method


for _name, _op in {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul,
    "truediv": operator.truediv, "floordiv": operator.floordiv, "pow": operator.pow,
    "matmul": operator.matmul, "mod": operator.mod, "and": operator.and_,
    "or": operator.or_, "xor": operator.xor,
}.items():  # fmt: skip
    setattr(FakeDeviceArray, f"__{_name}__", _binary(_op))
    setattr(FakeDeviceArray, f"__r{_name}__", _binary(_op, reflected=True))
for _name, _op in {
    "add": operator.iadd, "sub": operator.isub, "mul": operator.imul,
    "truediv": operator.itruediv, "pow": operator.ipow, "matmul": operator.imatmul,
}.items():  # fmt: skip
    setattr(FakeDeviceArray, f"__i{_name}__", _inplace(_op))
for _name, _op in {
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
    "eq": operator.eq, "ne": operator.ne,
}.items():  # fmt: skip
    setattr(FakeDeviceArray, f"__{_name}__", _binary(_op))
FakeDeviceArray.__hash__ = None  # type: ignore[assignment]
FakeDeviceArray.__neg__ = lambda self: _wrap(-self._a)  # type: ignore[attr-defined]
FakeDeviceArray.__pos__ = lambda self: _wrap(+self._a)  # type: ignore[attr-defined]
FakeDeviceArray.__abs__ = lambda self: _wrap(abs(self._a))  # type: ignore[attr-defined]
FakeDeviceArray.__invert__ = lambda self: _wrap(~self._a)  # type: ignore[attr-defined]


def _check_operand(x: Any) -> None:
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")


def _unwrap(x: Any) -> Any:
    """Device data for numpy, refusing host arrays (as cupy does)."""
    if isinstance(x, FakeDeviceArray):
        return x._a
    _check_operand(x)
    if isinstance(x, tuple):
        return tuple(_unwrap(v) for v in x)
    if isinstance(x, list):
        return [_unwrap(v) for v in x]
    return x


def _wrap(x: Any) -> Any:
    """Results on the device: arrays and numpy scalars (cupy's reductions give 0-d arrays)."""
    if isinstance(x, np.ndarray):
        return FakeDeviceArray(x)
    if isinstance(x, np.generic):
        return FakeDeviceArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _call(func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
    out = kwargs.get("out")
    result = func(*_unwrap(tuple(args)), **{k: _unwrap(v) for k, v in kwargs.items()})
    if out is not None:  # in place: hand back the caller's device array(s)
        return out
    return _wrap(result)


class _Namespace:
    """``cupy``-like module over a numpy module: the same functions, on device arrays."""

    def __init__(self, module: Any, allowed: tuple[str, ...] = ()) -> None:
        self._module = module
        self._allowed = allowed

    def __getattr__(self, name: str) -> Any:
        if name == "random":  # draw on the host (pipeline.backend.gaussian)
            raise AttributeError("the emulated device has no random module")
        if name == "linalg":
            return _LINALG
        value = getattr(self._module, name)
        if isinstance(value, type) or not callable(value):  # dtypes, constants, finfo
            return value
        return lambda *args, **kwargs: _call(value, args, kwargs)


def asarray(x: Any, dtype: Any = None) -> FakeDeviceArray:
    """The explicit host → device copy (or a device array, cast when ``dtype`` asks)."""
    if isinstance(x, FakeDeviceArray):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    host = np.array(x, dtype=dtype, copy=True)
    STATS.add("transfers")
    STATS.add("transferred_bytes", host.nbytes)
    return FakeDeviceArray(host)


class _Xp(_Namespace):
    asarray = staticmethod(asarray)
    array = staticmethod(asarray)

    def asnumpy(self, x: FakeDeviceArray) -> np.ndarray:
        return x.get()


_LINALG = _Namespace(np.linalg)
xp = _Xp(np)


def solve_triangular(a: Any, b: Any, trans: Any = 0, lower: bool = False, **kwargs: Any) -> Any:
    """``cupyx.scipy.linalg.solve_triangular`` on device arrays."""
    from scipy.linalg import solve_triangular as host_solve

    kwargs.pop("overwrite_b", None)
    return _wrap(host_solve(_unwrap(a), _unwrap(b), trans=trans, lower=lower, **kwargs))


DEVICE = Device(
    name="cupy",
    xp=xp,
    array_type=FakeDeviceArray,
    to_host=lambda x: x.get(),
    solve_triangular=solve_triangular,
    memory_bytes=lambda: 16 * 2**30,
)
