"""The attester side of the attestation service, with tpm2-pytss (issue 6).

``attest(verifier_url, tcti, ...)``: on first use, register (EK certificate +
EK public + AK public) and answer the MakeCredential challenge with
TPM2_ActivateCredential (TPM 2.0 Part 3, 12.5); keep the attester id and token
in a state file; then challenge -> TPM2_Quote over the requested PCRs with the
nonce -> evidence (quote, signature, PCR values, event log) -> verdict.

IMA (issue 14): with an IMA list (:class:`ImaListFile`, the kernel's
``binary_runtime_measurements`` by default) and a challenge that asks for it
(``ima`` in the answer: the policy has a runtime part), the evidence carries
the entries from the challenge's ``ima.next_index`` on, read after the quote
so the list covers what was quoted; from entry 0 when the quote is of
another boot than that index (resetCount/restartCount differ).

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
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from vtpm_core.errors import ConfigError, ParseError, TpmError, VtpmTrustError

__all__ = [
    "DEFAULT_EVENTLOG",
    "DEFAULT_IMA_LIST",
    "AttesterState",
    "ImaListError",
    "ImaListFile",
    "TpmAttester",
    "VerifierError",
    "attest",
    "ima_start_index",
    "open_tcti",
]

DEFAULT_EVENTLOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
DEFAULT_IMA_LIST = Path("/sys/kernel/security/ima/binary_runtime_measurements")
_EK_CERT_RSA = 0x01C00002
_BANK_ALGS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
_TIMEOUT = 30


class VerifierError(VtpmTrustError):
    """The verifier answered with a problem (status and its detail)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"verifier answered {status}: {detail}")


class ImaListError(TpmError):
    """The IMA measurement list could not be read (an agent reports kind ``ima_list``)."""


_U32 = struct.Struct("<I")
_TEMPLATE_HASH = 20  # SHA-1 in binary_runtime_measurements (the default file)


def _entry_ends(data: bytes, ascii_form: bool) -> Iterator[int]:
    """The byte offset after each complete entry of a binary list (the header's lengths:
    u32 pcr, 20-byte template hash, u32 name length, name, then the legacy ``ima``
    template's digest + u32 length + name, or u32 length + template data) or of an
    ASCII one (lines). Only the boundaries: the verifier parses and proves the entries.
    A trailing partial entry is not yielded."""
    if ascii_form:
        pos = data.find(b"\n")
        while pos >= 0:
            yield pos + 1
            pos = data.find(b"\n", pos + 1)
        return
    pos, size = 0, len(data)
    while pos + 28 <= size:
        name_len = _U32.unpack_from(data, pos + 24)[0]
        p = pos + 28 + name_len
        if name_len > 255 or p + 4 > size:
            return
        if data[pos + 28 : p] == b"ima":
            p += 20
            if p + 4 > size:
                return
        p += 4 + _U32.unpack_from(data, p)[0]
        if p > size:
            return
        yield p
        pos = p


class ImaListFile:
    """The kernel's IMA list (or a file holding one, for tests), read from an entry index.

    Remembers, per boot, where the last delta began and ended (entry index and byte
    offset), so a round reads only the bytes from the nearest of those: neither the
    list nor its entries are kept. Binary or ASCII, told from the first byte.
    """

    def __init__(self, path: Path = DEFAULT_IMA_LIST) -> None:
        self.path = Path(path)
        self._boot: tuple[int, int] | None = None
        self._marks: list[tuple[int, int]] = [(0, 0)]
        self._ascii: bool | None = None

    def delta(self, start: int, boot: tuple[int, int]) -> bytes:
        """The complete entries from index ``start`` to the end of the list as it is now;
        ``boot`` (resetCount, restartCount of the quote) forgets the marks of another one."""
        if boot != self._boot:
            self._boot, self._marks = boot, [(0, 0)]
        index, offset = max((m for m in self._marks if m[0] <= start), default=(0, 0))
        try:
            with self.path.open("rb") as fh:
                if self._ascii is None:
                    first = fh.read(1)
                    self._ascii = bool(first) and first in b"0123456789 "
                fh.seek(offset)
                data = fh.read()
        except OSError as exc:
            raise ImaListError(f"IMA list {self.path} unreadable: {exc.strerror or exc}") from None
        ends = _entry_ends(data, self._ascii)
        begin = 0
        for _ in range(start - index):
            begin = next(ends, -1)
            if begin < 0:
                raise ImaListError(
                    f"the verifier asks for IMA entries from {start}; "
                    f"{self.path} has fewer in this boot"
                )
        count, end = start, begin
        for end in ends:  # noqa: B007 - the last one is the delta's end
            count += 1
        self._marks = [(index, offset), (start, offset + begin), (count, offset + end)]
        return data[begin:end]


def ima_start_index(hint: Any, quote: bytes) -> int:
    """The entry to send from: the challenge's ``ima.next_index`` when ``quote`` (our own
    TPMS_ATTEST, only read for its clock) is of the boot that index belongs to, else 0."""
    from vtpm_core.tpm import Attest

    if not isinstance(hint, dict) or not isinstance(hint.get("next_index"), int):
        raise VerifierError(201, "the challenge's ima has no next_index")
    info = Attest.parse(quote).clock_info
    same = (hint.get("reset_count"), hint.get("restart_count")) == (
        info.reset_count,
        info.restart_count,
    )
    return int(hint["next_index"]) if same else 0


def _quote_boot(quote: bytes) -> tuple[int, int]:
    from vtpm_core.tpm import Attest

    info = Attest.parse(quote).clock_info
    return info.reset_count, info.restart_count


ImaSource = Callable[[int, tuple[int, int]], bytes]


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
    ima: ImaSource | None = None,
) -> dict[str, Any]:
    """Challenge -> quote -> evidence; returns the verifier's result.

    ``ima(start, boot)``: the IMA entries from ``start`` (``ImaListFile.delta``),
    sent when the challenge asks for them."""
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
    if ima is not None and "ima" in ch:
        start = ima_start_index(ch["ima"], q.attest)  # after the quote: the list covers it
        evidence["ima"] = {"start_index": start, "entries": _b64(ima(start, _quote_boot(q.attest)))}
    return _call(http, "POST", f"{base}/evidence", token=state.token, body=evidence)


def attest(
    verifier: str,
    tcti: str,
    *,
    state_file: Path,
    event_log: bytes | None = None,
    vm_id: str | None = None,
    ima_list: Path | None = None,
) -> dict[str, Any]:
    """The whole attester flow; the state file is created on first use. ``ima_list``:
    the IMA list whose entries after the verified ones go with the evidence."""
    verifier = verifier.rstrip("/")
    state = AttesterState.load(state_file)
    if state is not None and state.verifier != verifier:
        state = None  # registered with another verifier: enrol here too
    with requests.Session() as http, TpmAttester.open(tcti) as tpm:
        if state is None:
            state = enroll(http, verifier, tpm, vm_id=vm_id)
            state.save(state_file)
        ima = ImaListFile(ima_list).delta if ima_list is not None else None
        result = attest_once(http, state, tpm, event_log, ima)
    return {"attester_id": state.attester_id, **result}
