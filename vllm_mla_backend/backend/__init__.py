"""vLLM integration: registration, the MLA backend classes, and vLLM-specific fixups."""
