"""TCG PC Client firmware event logs: parse -> replay/verify -> decoded, digest-checked events.

Spec: TCG PC Client Platform Firmware Profile Specification v1.05 §10
("Event Logging"); UEFI Specification 2.10 for device paths and variables.

    log = EventLog.parse(data)                 # unverified framing
    replayed = log.verify(quoted_pcrs)         # raises VerificationError on mismatch
    for event in replayed.events:              # policy only ever sees these
        event.decoded, event.data_verified, event.warnings
"""

from verifier.eventlog.algorithms import HashAlgorithm
from verifier.eventlog.decode import (
    DataCheck,
    Decoded,
    FirmwareBlob,
    GptEvent,
    HandoffTables,
    ImageLoad,
    IplString,
    NoActionEvent,
    Separator,
    TaggedEvent,
    Text,
    check_event,
    decode_event,
)
from verifier.eventlog.devicepath import DevicePath, DevicePathNode
from verifier.eventlog.efivars import (
    BootOrder,
    EfiBoolean,
    EfiVariable,
    LoadOption,
    SignatureData,
    SignatureDatabase,
    SignatureList,
)
from verifier.eventlog.events import EVENT_TYPES, EventType, type_name
from verifier.eventlog.limits import Limits
from verifier.eventlog.parse import Event, EventLog, SpecIdEvent, StartupLocality
from verifier.eventlog.quirks import QUIRKS, AppliedQuirk, Quirk
from verifier.eventlog.replay import PcrBanks, ReplayedEvent, ReplayedLog, replay_events

__all__ = [
    "EVENT_TYPES",
    "QUIRKS",
    "AppliedQuirk",
    "BootOrder",
    "DataCheck",
    "Decoded",
    "DevicePath",
    "DevicePathNode",
    "EfiBoolean",
    "EfiVariable",
    "Event",
    "EventLog",
    "EventType",
    "FirmwareBlob",
    "GptEvent",
    "HandoffTables",
    "HashAlgorithm",
    "ImageLoad",
    "IplString",
    "Limits",
    "LoadOption",
    "NoActionEvent",
    "PcrBanks",
    "Quirk",
    "ReplayedEvent",
    "ReplayedLog",
    "Separator",
    "SignatureData",
    "SignatureDatabase",
    "SignatureList",
    "SpecIdEvent",
    "StartupLocality",
    "TaggedEvent",
    "Text",
    "check_event",
    "decode_event",
    "replay_events",
    "type_name",
]
