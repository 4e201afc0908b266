"""EK provisioning on a bare swtpm: TPM properties, NV writes in chunks, refusals.

Each test runs with both command paths: tpm2-pytss's ESAPI (``EsapiTpm``, the plain
version) and the hand-marshalled ``RawTpm`` `vtpm create` uses; the differential
tests check that they give the TPM the same commands' results.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import Tools
from tests.vtpm_core._issuer import SmallIssuer
from vtpm_core.errors import ConfigError, TpmError, VerificationError
from vtpm_core.issuer import EkCertificateRequest, IssuedEkCertificate
from vtpm_core.provision import (
    EK_CERT_NV_ATTRIBUTES_LOCKED,
    EsapiTpm,
    ProvisioningTpm,
    VmIdentityRef,
    create_ek,
    ek_template,
    provision_eks,
    read_nv,
    read_nv_attributes,
    read_tpm_info,
    write_certificate,
)
from vtpm_core.record import EK_KINDS
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.tpm_client import RawTpm

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

pytestmark = pytest.mark.swtpm

IDENTITY = VmIdentityRef(__import__("uuid").UUID(int=1), "vm", __import__("uuid").UUID(int=2))


@pytest.fixture
def uswtpm(tmp_path: Path) -> Iterator[SwtpmProcess]:
    """A fresh swtpm on a unix socket: RawTpm's transport (as in `vtpm create`)."""
    with SwtpmProcess(tmp_path / "uswtpm-state", transport="unix") as tpm:
        yield tpm


@pytest.fixture(params=["esapi", "raw"])
def path(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ProvisioningTpm, SwtpmProcess]]:
    """The provisioning commands through one path, and the swtpm they go to: tpm2-pytss
    over TCP (tpm2-tools can read it too), or RawTpm over a unix socket."""
    raw = request.param == "raw"
    with SwtpmProcess(tmp_path / "state", transport="unix" if raw else "tcp") as swtpm:
        yield (swtpm.raw_tpm() if raw else EsapiTpm(swtpm.esapi())), swtpm


def _reader(tpm: ProvisioningTpm, swtpm: SwtpmProcess) -> ESAPI:
    """An ESAPI to read back with: the same one, or a new one once the raw path is closed."""
    if isinstance(tpm, EsapiTpm):
        return tpm.esapi
    assert isinstance(tpm, RawTpm)
    tpm.close()
    return swtpm.esapi()


def test_tpm_info_of_swtpm(path: tuple[ProvisioningTpm, SwtpmProcess]) -> None:
    info = read_tpm_info(path[0])
    assert info.manufacturer == 0x49424D00
    assert info.vendor.startswith("SW")
    assert info.spec_family == "2.0"
    assert info.firmware_version_1 == info.firmware_version >> 32 > 0


def test_long_certificate_is_written_in_chunks(
    path: tuple[ProvisioningTpm, SwtpmProcess], tmp_path: Path
) -> None:
    tpm, swtpm = path
    data = bytes(range(250)) * 8  # 2000 bytes: two NV_BUFFER_MAX (1024) chunks
    write_certificate(tpm, 0x01C00012, data)
    # write-locked: a second definition with platform auth fails, naming the command
    with pytest.raises(TpmError, match="NV_DefineSpace"):
        write_certificate(tpm, 0x01C00012, b"again")
    esapi = _reader(tpm, swtpm)
    assert read_nv_attributes(esapi, 0x01C00012) == (EK_CERT_NV_ATTRIBUTES_LOCKED, len(data))
    assert read_nv(esapi, 0x01C00012) == data
    if swtpm.endpoint.transport == "tcp":  # tpm2-tools (tss 3.2) reach swtpm over TCP only
        esapi.close()
        Tools(swtpm, tmp_path).run("tpm2_nvread", "0x01c00012", "-o", "nv.bin")
        assert (tmp_path / "nv.bin").read_bytes() == data


def test_raw_and_esapi_give_the_same_eks_and_nv(uswtpm: SwtpmProcess) -> None:
    """Differential: the same endorsement seed gives the same EK public areas through
    both paths, and both leave an NV index with the same attributes and bytes."""
    raw = uswtpm.raw_tpm()
    raw_info = read_tpm_info(raw)
    raw_eks = {kind: create_ek(raw, ek_template(kind)) for kind in EK_KINDS}
    write_certificate(raw, 0x01C00012, b"raw path " * 150)
    raw.close()
    plain = EsapiTpm(uswtpm.esapi())
    assert read_tpm_info(plain) == raw_info
    assert {kind: create_ek(plain, ek_template(kind)) for kind in EK_KINDS} == raw_eks
    write_certificate(plain, 0x01C00014, b"raw path " * 150)
    esapi = plain.esapi
    assert read_nv_attributes(esapi, 0x01C00012) == read_nv_attributes(esapi, 0x01C00014)
    assert read_nv(esapi, 0x01C00012) == read_nv(esapi, 0x01C00014) == b"raw path " * 150


def test_raw_errors_name_the_command_and_the_response_code(uswtpm: SwtpmProcess) -> None:
    raw = uswtpm.raw_tpm()
    write_certificate(raw, 0x01C00012, b"x")
    with pytest.raises(TpmError, match=r"NV_DefineSpace\(0x01c00012, 1 bytes\): .*NV_DEFINED"):
        write_certificate(raw, 0x01C00012, b"x")
    with pytest.raises(
        TpmError, match=r"NV_Write\(0x01c00016, offset 0\): .*0x28b TPM_RC_HANDLE .*handle 2"
    ):
        raw.nv_write(0x01C00016, b"x", 0)  # never defined
    uswtpm.stop()  # the TPM is gone: the socket error is a TpmError too
    with pytest.raises(TpmError, match="swtpm"):
        read_tpm_info(raw)


class _WrongKeyIssuer(SmallIssuer):
    """Certifies a different key than the one asked for."""

    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        other = SmallIssuer().issue_ek_certificate(request)
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        cert = x509.load_der_x509_certificate(other.certificate_der)
        forged = (
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(cert.issuer)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(cert.serial_number)
            .not_valid_before(dt.datetime(2020, 1, 1))
            .not_valid_after(dt.datetime(2040, 1, 1))
            .sign(self.key, hashes.SHA256())
        )
        return IssuedEkCertificate(
            cert.serial_number, forged.public_bytes(serialization.Encoding.DER), b""
        )


class _GarbageIssuer(SmallIssuer):
    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        return IssuedEkCertificate(1, b"\x30\x03\x02\x01\x00", b"")


@pytest.mark.parametrize(
    ("case", "kinds", "issuer", "exc", "match"),
    [
        pytest.param("other-key", ["ecc-p256"], _WrongKeyIssuer(), VerificationError,
                     "certified another key than the ecc-p256 EK", id="fail/issuer/other-key"),
        pytest.param("garbage", ["ecc-p256"], _GarbageIssuer(), VerificationError,
                     "unreadable certificate", id="fail/issuer/garbage"),
        pytest.param("dup", ["ecc-p256", "ecc-p256"], SmallIssuer(), ConfigError, "twice",
                     id="fail/kinds/duplicate"),
        pytest.param("unknown", ["rsa1024"], SmallIssuer(), ConfigError, "unknown EK kind",
                     id="fail/kinds/unknown"),
    ],
)  # fmt: skip
def test_provision_refusals(
    path: tuple[ProvisioningTpm, SwtpmProcess], case: str, kinds: list[str],
    issuer: SmallIssuer, exc: type[Exception], match: str,
) -> None:  # fmt: skip
    tpm, swtpm = path
    with pytest.raises(exc, match=match):
        provision_eks(tpm, kinds=kinds, identity=IDENTITY, issuer=issuer)
    # nothing was written to NV for a refused certificate
    with pytest.raises(TpmError):
        read_nv_attributes(_reader(tpm, swtpm), 0x01C0000A)


def test_meanwhile_runs_once_while_the_first_ek_is_made(
    path: tuple[ProvisioningTpm, SwtpmProcess],
) -> None:
    """`vtpm create` opens the CA in ``meanwhile``: it runs once, before any certificate
    is asked for; when it fails, nothing is certified or written."""
    tpm = path[0]
    events: list[str] = []

    class Recording(SmallIssuer):
        def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
            events.append("issue")
            return super().issue_ek_certificate(request)

    _info, eks = provision_eks(
        tpm, kinds=list(EK_KINDS), identity=IDENTITY, issuer=Recording(),
        meanwhile=lambda: events.append("meanwhile"),
    )  # fmt: skip
    assert events == ["meanwhile", "issue", "issue"]
    assert [ek.kind for ek in eks] == list(EK_KINDS)

    def fail() -> None:
        raise ConfigError("the CA cannot be opened")

    with pytest.raises(ConfigError, match="cannot be opened"):
        provision_eks(tpm, kinds=["ecc-p256"], identity=IDENTITY, issuer=Recording(),
                      meanwhile=fail)  # fmt: skip
    assert events == ["meanwhile", "issue", "issue"]
