"""torch.compile applied in place, so that nothing about a module's names changes.

`torch.compile(module)` returns an `OptimizedModule` wrapper whose parameters and state_dict
keys carry an `_orig_mod.` prefix: layer-decay groups, checkpoints, resume checks and exported
safetensors would all see other names. `nn.Module.compile()` instead compiles the module's own
`__call__` in place; its parameters, names and state_dict stay those of the timm module.

Compilation is lazy: `compile_in_place` only installs the wrapper; the first call traces and
compiles (tens of seconds on a CPU), and each new guard (train/eval mode, grad mode, a batch of
another size, a parameter whose `requires_grad` changed) compiles another graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch._dynamo
from torch import nn

# Where `nn.Module.compile()` keeps the compiled call (torch >= 2.2); `__call__` uses it when set.
_COMPILED_CALL = "_compiled_call_impl"


def compile_in_place(module: nn.Module, **options: object) -> None:
    """Compile `module`'s `__call__` in place (`torch.compile` options, e.g. `mode`)."""
    module.compile(**options)


def allow_recompiles(graphs: int) -> None:
    """Let dynamo keep at least `graphs` graphs per function before it falls back to eager.

    Past `recompile_limit` (8) dynamo stops compiling that function and runs it eagerly, with
    one warning: a run would silently lose its compiled speed halfway through. The limit is
    process-wide, so it is only ever raised here.
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs)


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, _COMPILED_CALL, None) is not None


def uncompile(module: nn.Module) -> None:
    """Back to eager calls; the module's parameters were never touched."""
    if hasattr(module, _COMPILED_CALL):
        setattr(module, _COMPILED_CALL, None)


@contextmanager
def eager(module: nn.Module) -> Iterator[nn.Module]:
    """Call `module` eagerly for a while (hooks, attention capture), then restore its compile."""
    saved = getattr(module, _COMPILED_CALL, None)
    uncompile(module)
    try:
        yield module
    finally:
        if saved is not None:
            setattr(module, _COMPILED_CALL, saved)
