"""The planning core: a training setup in, a named memory breakdown out, and the search over a budget.

Standard library only (``memplan fit`` must start fast without torch or a GPU); it imports the catalog wing
and nothing heavier. Where each memory term lives:

- ``setup``: ``TrainSetup``, its knobs (values, defaults, help), ``resolve_setup``, the sequence limit;
- ``dtypes``, ``optimizers``: dtype names and sizes; optimizer state per HF ``optim`` name;
- ``weights``: base weights, 4-bit / int8 storage and quantization constants;
- ``trainable``: LoRA (or full) trainable tensors, gradients, optimizer state;
- ``activations``: saved activations per layer, logits and loss, backward transients, attention kernel;
- ``runtime``: CUDA context, allocator overhead, cuBLAS workspace;
- ``breakdown``: the component and phase names every answer uses; ``estimate``: the phases put together;
- ``budget``: what a plan may use of a card; ``search``: ``fit``; ``changes``: one-knob fixes.
"""
