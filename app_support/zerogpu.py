"""ZeroGPU: the app's GPU calls as ``spaces.GPU`` functions on a ZeroGPU Space, plain functions everywhere else.

On a ZeroGPU Space (``SPACES_ZERO_GPU`` set to 1, t or true, any case: how the ``spaces`` package reads it) a GPU
is attached only inside a function decorated with ``spaces.GPU(duration=...)``. Each call of it runs in a forked
child process, with its arguments and result pickled through a queue, is time-boxed to ``duration`` seconds and is
charged to the visitor's daily quota. ``gpu(duration=...)`` decorates a function that way there and returns it
unchanged anywhere else, so the same handler runs in-process on a laptop, in CI or on a Space with its own GPU.
(``spaces.GPU`` itself does nothing off ZeroGPU either; going through ``gpu`` means the app also runs where the
package is not installed.)

The package is imported only on ZeroGPU, and there as soon as this module is imported: it patches torch so that
CUDA is emulated in the main process, and refuses to once CUDA was initialised. Import this module before anything
moves a model to the GPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar, cast

ZERO_GPU_ENV = "SPACES_ZERO_GPU"
# The values the spaces package takes for true (spaces/config.py); anything else is off.
_TRUE = ("1", "t", "true")
# spaces' own default time box.
DEFAULT_DURATION_SECONDS = 60

Function = TypeVar("Function", bound=Callable[..., Any])


def on_zerogpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (read at each call: tests and tools may set it later)."""
    value = os.environ.get(ZERO_GPU_ENV)
    return value is not None and value.lower() in _TRUE


def _spaces() -> ModuleType:
    try:
        return importlib.import_module("spaces")
    except ImportError as error:
        raise ImportError(
            f"this is a ZeroGPU Space ({ZERO_GPU_ENV}={os.environ.get(ZERO_GPU_ENV)}) but the spaces package cannot "
            f"be imported ({error}); install it: pip install spaces"
        ) from error


def gpu(duration: int | Callable[..., int] = DEFAULT_DURATION_SECONDS) -> Callable[[Function], Function]:
    """A decorator: on ZeroGPU ``spaces.GPU(duration=duration)(function)``, elsewhere ``function`` itself.

    ``duration``: the call's time box in whole seconds, or a function of the call's arguments that returns it (as
    ``spaces.GPU`` accepts). On ZeroGPU the decorated function's arguments and result must pickle, and what it
    changes in memory stays in the child: let it write its results to files or return them.
    """
    if callable(duration):
        pass
    elif isinstance(duration, bool) or not isinstance(duration, int) or duration < 1:
        raise ValueError(f"duration must be a positive whole number of seconds or a function, got {duration!r}")

    def decorate(function: Function) -> Function:
        if not on_zerogpu():
            return function
        return cast(Function, _spaces().GPU(duration=duration)(function))

    return decorate


if on_zerogpu():
    _spaces()  # now: its torch patch must come before anything initialises CUDA
