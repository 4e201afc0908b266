"""Measured-boot simulator: extends a vTPM's PCRs like UEFI firmware and writes the event log."""

from vtpm_core.measured_boot.description import (
    BootApplication,
    BootDescription,
    FirmwareBlob,
    Measured,
)
from vtpm_core.measured_boot.simulator import (
    SimulatedBoot,
    active_banks,
    build_boot_log,
    extend_pcrs,
    simulate_boot,
)

__all__ = [
    "BootApplication",
    "BootDescription",
    "FirmwareBlob",
    "Measured",
    "SimulatedBoot",
    "active_banks",
    "build_boot_log",
    "extend_pcrs",
    "simulate_boot",
]
