"""Cloning a vTPM, as VMware clones a VM with a vTPM.

- ``copy`` keeps the TPM: the new vTPM starts from a byte-identical copy of
  the source's encrypted state (same EK, same seeds, same NV certificates,
  so every secret sealed in the source unseals in the copy). It gets its own
  vTPM id and VM id; the data key is the same key, wrapped again under the new
  vTPM id. The CA is asked to certify each EK for the new VM with
  ``clone_of`` set, so its ledger records the second binding of one EK and a
  verifier can see the duplicate identity.
- ``replace`` gives the new VM a new, empty vTPM: new seeds, new EKs, new
  certificates, new data key - nothing from the source.

Both are crash-safe like ``create``: the clone appears only when complete.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Literal

from vtpm_core.errors import ConfigError
from vtpm_core.instance import preflight
from vtpm_core.issuer import EkCertificateIssuer, EkCertificateRequest
from vtpm_core.record import Origin, VtpmRecord, check_name

if TYPE_CHECKING:
    from vtpm_core.store import VtpmStore

__all__ = ["clone"]


def clone(
    store: VtpmStore,
    source: str,
    new: str,
    *,
    mode: Literal["copy", "replace"],
    issuer: EkCertificateIssuer | None,
    vm_id: uuid.UUID | None = None,
) -> VtpmRecord:
    check_name(new)
    src = store.get(source)
    origin_kind: Literal["clone-copy", "clone-replace"]
    if mode == "replace":
        origin_kind = "clone-replace"
        return store.create(
            new,
            issuer=issuer,
            ek=[ek.kind for ek in src.eks],
            vm_id=vm_id,
            origin=Origin(origin_kind, src.name, src.vtpm_id, src.vm_id),
            key_provider=src.key.provider,
        )
    if mode != "copy":
        raise ConfigError(f"unknown clone mode {mode!r} (copy or replace)")
    store._require_free(new)
    state = store.read_state(source)
    data_key = store.data_key(src)  # the source's key must open before anything is written
    vtpm_id = uuid.uuid4()
    vm_id = vm_id or uuid.uuid4()
    bound: list[int] = []
    if issuer is not None:
        for ek in src.eks:
            issued = issuer.issue_ek_certificate(
                EkCertificateRequest(
                    ek_public=ek.public,
                    vm_id=vm_id,
                    vm_name=new,
                    vtpm_instance_id=str(vtpm_id),
                    template_id=ek.template_id,
                    tpm_manufacturer=src.tpm.manufacturer,
                    tpm_model=src.tpm.vendor,
                    tpm_version=src.tpm.firmware_version_1,
                    clone_of=src.vm_id,
                )
            )
            bound.append(issued.serial)
    record = VtpmRecord(
        name=new,
        vtpm_id=vtpm_id,
        vm_id=vm_id,
        created_at=store.now(),
        key=store.wrap_new(vtpm_id, data_key, src.key.provider),
        tpm=src.tpm,
        eks=src.eks,
        ek_cert_mode=src.ek_cert_mode,
        origin=Origin("clone-copy", src.name, src.vtpm_id, src.vm_id),
        bound_serials=tuple(bound),
    )
    with store.staging() as stage:
        state_dir = stage / "state"
        state_dir.mkdir()
        for fname, content in state.items():
            (state_dir / fname).write_bytes(content)
        with store.socket_dir(stage / "run") as run:
            preflight(state_dir, data_key, run, store.key_context(record))
        from vtpm_core._atomic import remove_tree

        remove_tree(stage / "run")
        store.write_record(stage, record)
        store.publish(stage, new, "clone")
    return store.get(new)
