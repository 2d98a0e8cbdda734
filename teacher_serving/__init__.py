"""Stage 1: the teacher on Ray + vLLM, and the annotation job that writes the key-information ledger."""
