"""What the teacher is asked for and when its answer is usable.

text format: the paper's free-text key information. json format: a fixed schema, enforced token
by token by vLLM's guided decoding (structured outputs), with bounded fields so every answer
closes within max_new_tokens. `classify` turns one engine output into a ledger status; only
"ok" answers reach Stage 2 (distil.data.load_key_info).
"""

from __future__ import annotations

import json

STRING_FIELDS = ("patient_demographics", "presentation", "history", "outcome")
LIST_FIELDS = ("diagnoses", "investigations", "medications", "procedures")
MAX_LIST_ITEMS = 16

# Final statuses of a ledger record. Retried first: empty, truncated, invalid_json.
STATUSES = ("ok", "empty", "truncated", "invalid_json", "ungrounded", "skipped_too_long")
RETRYABLE = ("empty", "truncated", "invalid_json")


def key_info_schema(max_field_chars: int) -> dict:
    """JSON schema of structured key information (teacher.key_info_format: json)."""
    text = {"type": "string", "maxLength": max_field_chars}
    properties = {name: text for name in STRING_FIELDS}
    properties.update({name: {"type": "array", "items": text, "maxItems": MAX_LIST_ITEMS} for name in LIST_FIELDS})
    order = ("patient_demographics", "presentation", "history", "diagnoses", "investigations", "medications",
             "procedures", "outcome")
    return {"type": "object", "properties": {k: properties[k] for k in order}, "required": list(order),
            "additionalProperties": False}


def classify(text: str, finish_reason: str | None, key_info_format: str) -> str:
    """Status of one answer: ok, empty, truncated (cut at max_new_tokens) or invalid_json."""
    if not text.strip():
        return "empty"
    if finish_reason == "length":
        return "truncated"
    if key_info_format == "json":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return "invalid_json"
        if not isinstance(parsed, dict) or set(parsed) != set(STRING_FIELDS + LIST_FIELDS):
            return "invalid_json"
    return "ok"
