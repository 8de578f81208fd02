"""MLLP (Minimal Lower Layer Protocol): <VT> message <FS><CR> over TCP."""

SB = b"\x0b"
EB = b"\x1c"
CR = b"\x0d"


def frame(payload: bytes) -> bytes:
    return SB + payload + EB + CR
