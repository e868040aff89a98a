"""The CLI contract's --json line: one JSON object, NaN and Inf (an undefined interval, a
diverged run's loss, a target never reached) written as null."""
import json
import math


def json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    print(json.dumps(json_safe(obj), sort_keys=True, allow_nan=False))
