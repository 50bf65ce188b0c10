"""A pickled object whose unpickling runs code: what `torch.load(weights_only=False)` would do with
a hostile checkpoint. Tests assert that loading refuses it and that `CODE_RAN` stays empty."""
from __future__ import annotations

CODE_RAN: list[str] = []


def record_code_ran() -> str:
    CODE_RAN.append("unpickled")
    return "payload"


class Payload:
    """Unpickling it calls `record_code_ran`."""

    def __reduce__(self):
        return (record_code_ran, ())
