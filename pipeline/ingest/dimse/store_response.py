"""C-STORE responses encoded directly, as pynetdicom would encode them.

pynetdicom turns each response primitive into a pydicom data set (an element per command
field, each value validated), encodes it once to learn the group length and again to send it:
about 0.3 ms for the seven elements of a C-STORE-RSP, close to a tenth of the receiver's CPU
per instance. The response we send is nearly always the same shape: status, message ID and the
two UIDs, nothing else. For that shape :class:`StoreResponse` writes the command set's bytes
itself (Implicit VR Little Endian, PS3.7 6.3.1); any other shape (an error comment, an
offending element, a missing field, a peer whose PDUs are too small for it) goes through
pynetdicom's own code. Tests check the bytes against pynetdicom's for both.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from pynetdicom import dimse
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

STORE_RSP_COMMAND = 0x8001
NO_DATA_SET = 0x0101
LAST_COMMAND_FRAGMENT = b"\x03"  # message control header: command, last fragment
PDV_HEADER = 6  # PDV item length (4) and context ID (1), and the control header (1)


class StoreResponse(C_STORE_RSP):
    """pynetdicom's C-STORE-RSP message, encoded directly when the response is plain."""

    def __init__(self) -> None:
        # pynetdicom's __init__ builds the command data set; only the fallback needs it.
        self.context_id: int | None = None
        self._encoded: bytes | None = None
        self._primitive: C_STORE | None = None

    def primitive_to_message(self, primitive: Any) -> None:
        self._primitive = primitive
        self._encoded = encode_plain(primitive)
        if self._encoded is None:
            self._fall_back()

    def encode_msg(self, context_id: int, max_pdu_length: int) -> Iterator[P_DATA]:
        encoded = self._encoded
        if encoded is None or (max_pdu_length and len(encoded) + PDV_HEADER > max_pdu_length):
            if encoded is not None:
                self._fall_back()
            yield from super().encode_msg(context_id, max_pdu_length)
            return
        self.context_id = context_id
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + encoded))
        yield pdata

    def _fall_back(self) -> None:
        assert self._primitive is not None
        super().__init__()
        super().primitive_to_message(self._primitive)
        self._encoded = None


# pynetdicom finds a message's command fields by its class name.
StoreResponse.__name__ = StoreResponse.__qualname__ = C_STORE_RSP.__name__


def encode_plain(primitive: C_STORE) -> bytes | None:
    """The response's command set, or None when it is not the plain shape."""
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    if sop_class is None or sop_instance is None or message_id is None or status is None:
        return None
    try:
        class_uid, instance_uid = _uid(sop_class), _uid(sop_instance)
    except UnicodeEncodeError:  # pynetdicom decides what to make of it
        return None
    elements = b"".join(
        (
            _element(0x0002, class_uid),
            _element(0x0100, struct.pack("<H", STORE_RSP_COMMAND)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", NO_DATA_SET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, instance_uid),
        )
    )
    return _element(0x0000, struct.pack("<I", len(elements))) + elements


def _uid(value: str) -> bytes:
    data = str(value).encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def _element(element: int, value: bytes) -> bytes:
    """A command element in Implicit VR Little Endian: group 0000, element, length, value."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def install() -> None:
    """Idempotent: pynetdicom's DIMSE provider then sends C-STORE responses through this."""
    dimse._RSP_TO_MESSAGE[C_STORE] = StoreResponse
