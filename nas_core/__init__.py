"""nas_core: the pure editing engine (torch + transformers only).

Tensors and dataclasses in, tensors and dataclasses out. No file I/O, no environment
variables, no orchestration imports, no module-level mutable state. The device and dtype
always come from the tensors that are passed in.
"""

__version__ = "0.1.0"
