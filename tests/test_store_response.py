"""C-STORE responses encoded by the receiver's fast path are the bytes pynetdicom sends."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from pipeline.demo.dicom_series import new_uid
from pipeline.ingest.dimse.store_response import StoreResponse, encode_plain

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _response(
    status: int, sop_instance: str, message_id: int = 7, extra: dict[str, object] | None = None
) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT_STORAGE
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    for name, value in (extra or {}).items():
        setattr(primitive, name, value)
    return primitive


def _sent(cls: type[C_STORE_RSP], primitive: C_STORE, max_pdu: int) -> list[object]:
    message = cls()
    message.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in message.encode_msg(3, max_pdu)]


@pytest.mark.parametrize(
    ("status", "sop_instance", "message_id"),
    [
        (0x0000, "1.2.3.45", 1),  # even and odd UID lengths
        (0x0000, new_uid(), 65535),
        (0xA700, "1.2.826.0.1.3680043.8.498.1", 300),  # the refusals the receiver answers
        (0xC220, new_uid(), 2),
        (0xB000, new_uid(), 9),  # a warning
    ],
)
def test_a_plain_response_is_sent_as_pynetdicom_sends_it(
    status: int, sop_instance: str, message_id: int
) -> None:
    primitive = _response(status, sop_instance, message_id)
    assert encode_plain(primitive) is not None  # the fast path, not the fallback
    for max_pdu in (0, 16382, 4_194_304):
        assert _sent(StoreResponse, primitive, max_pdu) == _sent(C_STORE_RSP, primitive, max_pdu)


@pytest.mark.parametrize(
    "extra",
    [
        {"ErrorComment": "disk full"},
        {"OffendingElement": [0x00100010]},
    ],
)
def test_any_other_response_goes_through_pynetdicom(extra: dict[str, object]) -> None:
    primitive = _response(0xC000, new_uid(), extra=extra)
    assert encode_plain(primitive) is None
    assert _sent(StoreResponse, primitive, 16382) == _sent(C_STORE_RSP, primitive, 16382)


def test_a_peer_with_pdus_too_small_for_the_response_gets_pynetdicom_fragments() -> None:
    primitive = _response(0x0000, new_uid())
    expected = _sent(C_STORE_RSP, primitive, 64)
    assert len(expected) > 1  # the command set in several fragments
    assert _sent(StoreResponse, primitive, 64) == expected
