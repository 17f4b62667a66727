"""Functions ``LLM.apply_model`` ships to vLLM's worker processes (by reference: they must live in
an importable module, not in a ``__main__`` script)."""


def attention_backends(model) -> list[str]:
    """``BACKEND_NAME:impl.module.Class`` of every attention layer of the model."""
    names = set()
    for module in model.modules():
        impl = getattr(module, "impl", None)
        backend = getattr(module, "attn_backend", None)
        if impl is not None and backend is not None:
            names.add(f"{backend.get_name()}:{type(impl).__module__}.{type(impl).__qualname__}")
    return sorted(names)


def sparse_indexers(model) -> list[str]:
    """``module.Class`` of every DeepSeek V3.2 indexer op (``Indexer.indexer_op``) of the model."""
    return sorted({f"{type(m.indexer_op).__module__}.{type(m.indexer_op).__qualname__}"
                   for m in model.modules() if hasattr(m, "indexer_op")})
