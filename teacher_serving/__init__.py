"""Stage 1: the teacher on Ray + vLLM, and the annotation job that writes the key-information ledger.

    annotate(cfg)            the job (teacher_serving.annotate); launch/annotate.py calls it
    plan_replicas(nodes, …)  how many engine replicas a cluster holds, and their placement groups
    Ledger                   the append-only, resumable key-information JSONL

Importing this package imports neither Ray nor vLLM.
"""

from teacher_serving.annotate import annotate
from teacher_serving.ledger import Ledger
from teacher_serving.placement import plan_replicas

__all__ = ["annotate", "Ledger", "plan_replicas"]
