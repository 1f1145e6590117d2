"""The sans-IO core of relay/1: frame codec and tunnel session. Knows nothing of sockets or Twisted."""

from .frames import ErrorCode, FrameDecoder, ProtocolError
from .session import (
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    PongReceived,
    Role,
    SendWindowOpened,
    Session,
    StreamAccepted,
    StreamLimitError,
    StreamOpened,
    StreamReset,
)

__all__ = [
    "ControlReceived",
    "DataReceived",
    "ErrorCode",
    "FrameDecoder",
    "GoAwayReceived",
    "PongReceived",
    "ProtocolError",
    "Role",
    "SendWindowOpened",
    "Session",
    "StreamAccepted",
    "StreamLimitError",
    "StreamOpened",
    "StreamReset",
]
