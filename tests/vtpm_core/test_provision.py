"""EK provisioning on a bare swtpm: TPM properties, NV writes in chunks, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Tools
from tests.vtpm_core._issuer import SmallIssuer
from vtpm_core.errors import ConfigError, TpmError, VerificationError
from vtpm_core.issuer import EkCertificateRequest, IssuedEkCertificate
from vtpm_core.provision import (
    EK_CERT_NV_ATTRIBUTES_LOCKED,
    VmIdentityRef,
    provision_eks,
    read_nv,
    read_nv_attributes,
    read_tpm_info,
    write_certificate,
)
from vtpm_core.swtpm import SwtpmProcess

pytestmark = pytest.mark.swtpm

IDENTITY = VmIdentityRef(__import__("uuid").UUID(int=1), "vm", __import__("uuid").UUID(int=2))


def test_tpm_info_of_swtpm(swtpm: SwtpmProcess) -> None:
    info = read_tpm_info(swtpm.esapi())
    assert info.manufacturer == 0x49424D00
    assert info.vendor.startswith("SW")
    assert info.spec_family == "2.0"
    assert info.firmware_version_1 == info.firmware_version >> 32 > 0


def test_long_certificate_is_written_in_chunks(
    swtpm: SwtpmProcess, tools: Tools, tmp_path: Path
) -> None:
    data = bytes(range(250)) * 8  # 2000 bytes: two NV_BUFFER_MAX (1024) chunks
    esapi = swtpm.esapi()
    write_certificate(esapi, 0x01C00012, data)
    assert read_nv_attributes(esapi, 0x01C00012) == (EK_CERT_NV_ATTRIBUTES_LOCKED, len(data))
    assert read_nv(esapi, 0x01C00012) == data
    tools.run("tpm2_nvread", "0x01c00012", "-o", "nv.bin")
    assert (tmp_path / "nv.bin").read_bytes() == data
    # write-locked: a second write with platform auth fails
    with pytest.raises(TpmError, match="NV_DefineSpace"):
        write_certificate(esapi, 0x01C00012, b"again")


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
    swtpm: SwtpmProcess, case: str, kinds: list[str], issuer: SmallIssuer,
    exc: type[Exception], match: str,
) -> None:  # fmt: skip
    esapi = swtpm.esapi()
    with pytest.raises(exc, match=match):
        provision_eks(esapi, kinds=kinds, identity=IDENTITY, issuer=issuer)
    # nothing was written to NV for a refused certificate
    with pytest.raises(TpmError):
        read_nv_attributes(esapi, 0x01C0000A)
