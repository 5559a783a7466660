"""Plain-PyTorch references (run them in float64 on CPU to check every backend).

One submodule per op family: ``reference.lora``, ``reference.variants``, ``reference.serving``
(and the others beside them); ``reference.philox`` is the CUDA backend's dropout mask.
"""
