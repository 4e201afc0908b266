"""The attester side of the attestation service, with tpm2-pytss (issue 6).

``attest(verifier_url, tcti, ...)``: on first use, register (EK certificate +
EK public + AK public) and answer the MakeCredential challenge with
TPM2_ActivateCredential (TPM 2.0 Part 3, 12.5); keep the attester id and token
in a state file; then challenge -> TPM2_Quote over the requested PCRs with the
nonce -> evidence (quote, signature, PCR values, event log) -> verdict.

Keys: the EK is the TCG default RSA-2048 EK (template L-1, or the template in
NV if provisioned; EK Credential Profile 2.x, 2.2.1.4), its certificate read
from NV 0x01C00002. The AK is a *primary* restricted RSA-2048 signing key in
the endorsement hierarchy: derived from the endorsement seed, so the same AK
comes back every run without storing a key blob (what go-tpm-tools does for
its AK). Transient objects are flushed before returning.

TCTI strings: ``swtpm:host=127.0.0.1,port=2321``, ``device:/dev/tpmrm0``,
``mssim:...`` (any tpm2-tss TCTI as ``name:config``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from vtpm_core.errors import ConfigError, ParseError, TpmError, VtpmTrustError

__all__ = [
    "DEFAULT_EVENTLOG",
    "AttesterState",
    "TpmAttester",
    "VerifierError",
    "attest",
    "open_tcti",
]

DEFAULT_EVENTLOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
_EK_CERT_RSA = 0x01C00002
_BANK_ALGS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
_TIMEOUT = 30


class VerifierError(VtpmTrustError):
    """The verifier answered with a problem (status and its detail)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"verifier answered {status}: {detail}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def open_tcti(tcti: str) -> Any:
    """An ESAPI connected through the TCTI string ``name:config``."""
    from tpm2_pytss import ESAPI, TCTILdr

    # tpm2-tss logs expected misses (absent EK template indices) as errors
    os.environ.setdefault("TSS2_LOG", "all+none")
    name, _, conf = tcti.partition(":")
    if not name or name not in ("swtpm", "device", "mssim", "tabrmd"):
        raise ConfigError(f"TCTI {tcti!r}: expected swtpm:host=...,port=... or device:/dev/tpmrm0")
    try:
        return ESAPI(TCTILdr(name, conf))
    except Exception as exc:
        raise TpmError(f"cannot open TPM through {tcti!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Quote:
    attest: bytes  # TPMS_ATTEST as the TPM signed it
    signature: bytes  # TPMT_SIGNATURE
    pcrs: dict[str, dict[str, str]]


class TpmAttester:
    """EK, AK, activation and quotes on one TPM (the one tpm2-pytss adapter of the attester)."""

    def __init__(self, esapi: Any) -> None:
        self._esapi = esapi
        self._ek: Any = None
        self._ek_public: bytes = b""
        self._ak: Any = None
        self._ak_public: bytes = b""

    @classmethod
    @contextmanager
    def open(cls, tcti: str) -> Iterator[TpmAttester]:
        esapi = open_tcti(tcti)
        att = cls(esapi)
        try:
            yield att
        finally:
            att.flush()
            esapi.close()

    def flush(self) -> None:
        for handle in (self._ek, self._ak):
            if handle is not None:
                with contextlib.suppress(Exception):  # best effort on the way out
                    self._esapi.flush_context(handle)
        self._ek = self._ak = None

    def _nv_read(self, index: int) -> bytes:
        from tpm2_pytss.constants import ESYS_TR

        esapi = self._esapi
        handle = esapi.tr_from_tpmpublic(index)
        try:
            nvpub, _ = esapi.nv_read_public(handle)
            size = int(nvpub.nvPublic.dataSize)
            out = b""
            while len(out) < size:
                chunk = min(512, size - len(out))
                out += bytes(esapi.nv_read(handle, chunk, len(out), auth_handle=ESYS_TR.RH_OWNER))
            return out
        finally:
            esapi.tr_close(handle)

    def ek_certificate(self) -> bytes:
        """The RSA EK certificate from NV 0x01C00002, trailing NV padding removed."""
        try:
            data = self._nv_read(_EK_CERT_RSA)
        except Exception as exc:
            raise TpmError(f"no EK certificate at NV 0x{_EK_CERT_RSA:08X}: {exc}") from None
        # DER SEQUENCE length tells where the certificate ends (NV may be padded)
        if len(data) >= 4 and data[0] == 0x30 and data[1] == 0x82:
            data = data[: 4 + int.from_bytes(data[2:4], "big")]
        return data

    def ek(self) -> tuple[Any, bytes]:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        if self._ek is None:
            _nonce, template = create_ek_template("EK-RSA2048", NVReadEK(self._esapi))
            handle, pub, _, _, _ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
            self._ek, self._ek_public = handle, bytes(pub.marshal())
        return self._ek, self._ek_public

    def ak(self) -> tuple[Any, bytes]:
        from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC

        if self._ak is None:
            attrs = (
                TPMA_OBJECT.FIXEDTPM
                | TPMA_OBJECT.FIXEDPARENT
                | TPMA_OBJECT.SENSITIVEDATAORIGIN
                | TPMA_OBJECT.USERWITHAUTH
                | TPMA_OBJECT.RESTRICTED
                | TPMA_OBJECT.SIGN_ENCRYPT
            )
            template = TPM2B_PUBLIC.parse("rsa2048:rsassa-sha256:null", objectAttributes=attrs)
            handle, pub, _, _, _ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
            self._ak, self._ak_public = handle, bytes(pub.marshal())
        return self._ak, self._ak_public

    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the EK (policy: PolicySecret(endorsement)) and the AK."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
        from tpm2_pytss.types import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPMT_SYM_DEF

        try:
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except Exception as exc:
            raise ParseError("Credential", "credential_blob", 0, str(exc)) from None
        ek, _ = self.ek()
        ak, _ = self.ak()
        session = self._esapi.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        try:
            self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
            cert_info = self._esapi.activate_credential(
                ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
            )
        except Exception as exc:
            raise TpmError(f"TPM2_ActivateCredential failed: {exc}") from None
        finally:
            with contextlib.suppress(Exception):  # the session may already be gone
                self._esapi.flush_context(session)
        return bytes(cert_info)

    def quote(self, nonce: bytes, selection: dict[str, list[int]]) -> Quote:
        """TPM2_Quote with the AK over ``selection``, and the PCR values it covers."""
        from tpm2_pytss.types import TPML_PCR_SELECTION

        spec = "+".join(f"{bank}:{','.join(map(str, pcrs))}" for bank, pcrs in selection.items())
        for bank in selection:
            if bank not in _BANK_ALGS:
                raise ParseError("Challenge", "pcr_selection", 0, f"unknown bank {bank!r}")
        ak, _ = self.ak()
        pcrs: dict[str, dict[str, str]] = {}
        for bank, indices in selection.items():
            values: dict[str, str] = {}
            for start in range(0, len(indices), 8):  # PCR_Read returns at most 8 digests
                chunk = indices[start : start + 8]
                _, _sel, digests = self._esapi.pcr_read(
                    TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, chunk))}")
                )
                for i, d in zip(chunk, digests, strict=True):
                    values[str(i)] = bytes(d).hex()
            pcrs[bank] = values
        quoted, signature = self._esapi.quote(ak, TPML_PCR_SELECTION.parse(spec), nonce)
        return Quote(bytes(quoted.marshal())[2:], bytes(signature.marshal()), pcrs)


@dataclass(frozen=True, slots=True)
class AttesterState:
    """What an attester keeps between runs (the state/token file, mode 0600)."""

    verifier: str
    attester_id: str
    token: str

    @classmethod
    def load(cls, path: Path) -> AttesterState | None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable attester state: {exc}") from None
        try:
            return cls(str(doc["verifier"]), str(doc["attester_id"]), str(doc["token"]))
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: expected verifier, attester_id and token") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(
                {"verifier": self.verifier, "attester_id": self.attester_id, "token": self.token}, f
            )


def _call(
    http: requests.Session,
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = http.request(method, url, json=body, headers=headers, timeout=_TIMEOUT)
    except requests.RequestException as exc:
        raise VerifierError(0, f"cannot reach {url}: {exc}") from None
    try:
        doc = resp.json()
    except ValueError:
        doc = {}
    if resp.status_code >= 400:
        detail = doc.get("detail") if isinstance(doc, dict) else None
        raise VerifierError(resp.status_code, str(detail or resp.reason))
    if not isinstance(doc, dict):
        raise VerifierError(resp.status_code, "the verifier's answer is not a JSON object")
    return doc


def enroll(
    http: requests.Session, verifier: str, tpm: TpmAttester, *, vm_id: str | None = None
) -> AttesterState:
    """Register and activate: the first-use half of :func:`attest`."""
    _, ek_public = tpm.ek()
    _, ak_public = tpm.ak()
    body: dict[str, Any] = {
        "ek_certificate": _b64(tpm.ek_certificate()),
        "ek_public": _b64(ek_public),
        "ak_public": _b64(ak_public),
    }
    if vm_id:
        body["vm_id"] = vm_id
    reg = _call(http, "POST", f"{verifier}/v1/attesters", body=body)
    secret = tpm.activate(
        base64.b64decode(reg["credential_blob"]), base64.b64decode(reg["encrypted_secret"])
    )
    act = _call(
        http,
        "POST",
        f"{verifier}/v1/attesters/{reg['attester_id']}/activation",
        body={"secret": _b64(secret)},
    )
    return AttesterState(verifier, str(reg["attester_id"]), str(act["token"]))


def attest_once(
    http: requests.Session,
    state: AttesterState,
    tpm: TpmAttester,
    event_log: bytes | None,
) -> dict[str, Any]:
    """Challenge -> quote -> evidence; returns the verifier's result."""
    base = f"{state.verifier}/v1/attesters/{state.attester_id}"
    ch = _call(http, "POST", f"{base}/challenges", token=state.token)
    nonce = base64.b64decode(ch["nonce"])
    q = tpm.quote(nonce, {b: list(p) for b, p in ch["pcr_selection"].items()})
    _, ak_public = tpm.ak()
    evidence: dict[str, Any] = {
        "nonce": ch["nonce"],
        "quote": _b64(q.attest),
        "signature": _b64(q.signature),
        "pcrs": q.pcrs,
        "ak_public": _b64(ak_public),
    }
    if event_log is not None:
        evidence["event_log"] = _b64(event_log)
    return _call(http, "POST", f"{base}/evidence", token=state.token, body=evidence)


def attest(
    verifier: str,
    tcti: str,
    *,
    state_file: Path,
    event_log: bytes | None = None,
    vm_id: str | None = None,
) -> dict[str, Any]:
    """The whole attester flow; the state file is created on first use."""
    verifier = verifier.rstrip("/")
    state = AttesterState.load(state_file)
    if state is not None and state.verifier != verifier:
        state = None  # registered with another verifier: enrol here too
    with requests.Session() as http, TpmAttester.open(tcti) as tpm:
        if state is None:
            state = enroll(http, verifier, tpm, vm_id=vm_id)
            state.save(state_file)
        result = attest_once(http, state, tpm, event_log)
    return {"attester_id": state.attester_id, **result}
