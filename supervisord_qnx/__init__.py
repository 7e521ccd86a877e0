"""supervisord-qnx: WebAssembly tenants in kernel-enforced resource partitions.

This package's top level stays import-light on purpose: the wasm runner
process imports ``supervisord_qnx.wasm.runner`` and must not pay for trio,
pydantic or structlog at start-up.
"""

__version__ = "0.1.0"
