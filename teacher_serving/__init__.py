"""Stage 1: the teacher on Ray + vLLM, and the annotation job that writes the key-information ledger.

    annotate(cfg)            the job (teacher_serving.annotate); launch/annotate.py calls it
    plan_replicas(nodes, …)  how many engine replicas a cluster holds, and their placement groups
    TeacherPool, drive       what both passes send requests to, and the loop that keeps it fed

Importing this package imports neither Ray nor vLLM.
"""

from teacher_serving.annotate import annotate
from teacher_serving.placement import plan_replicas
from teacher_serving.pool import TeacherPool, drive

__all__ = ["annotate", "plan_replicas", "TeacherPool", "drive"]
