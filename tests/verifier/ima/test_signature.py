"""IMA signature format v2: keys generated here, signatures made by evmctl over real files."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from verifier.ima.signature import (
    ImaSignatureV2,
    SignatureState,
    TrustedKey,
    TrustedKeys,
    keyid_of_public_key,
    verify_ima_signature,
)
from vtpm_core.errors import ConfigError, ParseError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _pem(key: PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path


def _cert(key: PrivateKey, skid: bytes | None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ima test signer")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
    )
    if skid is not None:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(skid), critical=False)
    return builder.sign(key, hashes.SHA256())


def evmctl_sign(file: Path, key_pem: Path, algo: str, *extra: str) -> bytes:
    """What `evmctl ima_sign` writes to security.ima, via --sigfile (FILE.sig)."""
    subprocess.run(
        ["evmctl", "ima_sign", "--sigfile", "--key", str(key_pem), "-a", algo, *extra, str(file)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Path(f"{file}.sig").read_bytes()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def real_file(tmp_path: Path) -> Path:
    path = tmp_path / "prog"
    path.write_bytes(Path("/bin/true").read_bytes())
    return path


@pytest.mark.parametrize("algo", ["sha1", "sha256", "sha384", "sha512"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_evmctl_signature_verifies(
    kind: str, algo: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey,
    real_file: Path, tmp_path: Path,
) -> None:  # fmt: skip
    key: PrivateKey = rsa_key if kind == "rsa" else ec_key
    sig = evmctl_sign(real_file, _pem(key, tmp_path / "k.pem"), algo)
    digest = hashlib.new(algo, real_file.read_bytes()).digest()
    keys = TrustedKeys.of([TrustedKey.from_public_key(key.public_key())])

    check = verify_ima_signature(sig, algo, digest, keys)

    assert check.state is SignatureState.VALID, check.describe()
    parsed = ImaSignatureV2.parse(sig)
    assert parsed.keyid == keyid_of_public_key(key.public_key())
    assert parsed.hash_name == algo
    assert parsed.to_bytes() == sig


def test_keyid_from_certificate_skid_is_looked_up_exactly(
    rsa_key: rsa.RSAPrivateKey, real_file: Path, tmp_path: Path
) -> None:
    # A SKID that is not the SHA-1 of the key: only the certificate's id may match.
    cert = _cert(rsa_key, bytes(range(16, 36)))
    cert_der = tmp_path / "signer.der"
    cert_der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    sig = evmctl_sign(
        real_file, _pem(rsa_key, tmp_path / "k.pem"), "sha256", "--keyid-from-cert", str(cert_der)
    )
    digest = hashlib.sha256(real_file.read_bytes()).digest()
    assert ImaSignatureV2.parse(sig).keyid == bytes(range(32, 36))

    from_cert = TrustedKey.load(cert_der.read_bytes())
    assert from_cert.keyid == bytes(range(32, 36))
    assert from_cert.name == "CN=ima test signer"
    assert verify_ima_signature(sig, "sha256", digest, TrustedKeys.of([from_cert])).valid

    # The same key known by its SHA-1 id is another id: not looked up, not tried.
    bare = TrustedKey.from_public_key(rsa_key.public_key())
    check = verify_ima_signature(sig, "sha256", digest, TrustedKeys.of([bare]))
    assert check.state is SignatureState.UNKNOWN_KEY
    assert check.keyid == bytes(range(32, 36))


def test_certificate_without_skid_uses_sha1_id(ec_key: ec.EllipticCurvePrivateKey) -> None:
    pem = _cert(ec_key, None).public_bytes(serialization.Encoding.PEM)
    assert TrustedKey.load(pem).keyid == keyid_of_public_key(ec_key.public_key())


def test_public_key_pem_and_der_load(ec_key: ec.EllipticCurvePrivateKey) -> None:
    pub = ec_key.public_key()
    for enc in (serialization.Encoding.PEM, serialization.Encoding.DER):
        data = pub.public_bytes(enc, serialization.PublicFormat.SubjectPublicKeyInfo)
        loaded = TrustedKey.load(data, name="k")
        assert loaded.keyid == keyid_of_public_key(pub)
        assert loaded.name == "k"


@pytest.mark.parametrize(
    "data", [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"],
    ids=["empty", "garbage", "bad-pem"],
)  # fmt: skip
def test_unloadable_key_is_a_config_error(data: bytes) -> None:
    with pytest.raises(ConfigError, match=r"not an X\.509 certificate or a public key"):
        TrustedKey.load(data)


def test_ed25519_key_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ConfigError, match="not RSA or EC"):
        TrustedKey.load(der)


# -- every way a signature can fail ---------------------------------------------------------


def _sign(key: PrivateKey, digest: bytes, algo: hashes.HashAlgorithm) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, padding.PKCS1v15(), Prehashed(algo))
    return key.sign(digest, ec.ECDSA(Prehashed(algo)))


def _v2(keyid: bytes, sig: bytes, *, typ: int = 3, version: int = 2, algo: int = 4) -> bytes:
    return ImaSignatureV2(typ, version, algo, keyid, sig, b"").to_bytes()


@pytest.fixture(scope="module")
def signed(rsa_key: rsa.RSAPrivateKey) -> tuple[bytes, bytes, TrustedKeys]:
    digest = hashlib.sha256(b"file contents").digest()
    keyid = keyid_of_public_key(rsa_key.public_key())
    sig = _v2(keyid, _sign(rsa_key, digest, hashes.SHA256()))
    return sig, digest, TrustedKeys.of([TrustedKey.from_public_key(rsa_key.public_key())])


def test_generated_rsa_signature_is_valid(signed: tuple[bytes, bytes, TrustedKeys]) -> None:
    sig, digest, keys = signed
    assert verify_ima_signature(sig, "sha256", digest, keys).valid


def test_other_digest_is_invalid(signed: tuple[bytes, bytes, TrustedKeys]) -> None:
    sig, _, keys = signed
    other = hashlib.sha256(b"other contents").digest()
    check = verify_ima_signature(sig, "sha256", other, keys)
    assert check.state is SignatureState.INVALID
    assert "does not verify" in check.describe()


def test_flipped_signature_byte_is_invalid(signed: tuple[bytes, bytes, TrustedKeys]) -> None:
    sig, digest, keys = signed
    bad = sig[:-1] + bytes([sig[-1] ^ 1])
    assert verify_ima_signature(bad, "sha256", digest, keys).state is SignatureState.INVALID


def test_key_with_same_id_but_other_key_is_invalid(
    signed: tuple[bytes, bytes, TrustedKeys], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    sig, digest, keys = signed
    impostor = TrustedKey.from_public_key(ec_key.public_key(), keyid=keys.keys[0].keyid)
    check = verify_ima_signature(sig, "sha256", digest, TrustedKeys.of([impostor]))
    assert check.state is SignatureState.INVALID
    # both keys under one id: the right one is found
    both = TrustedKeys.of([impostor, keys.keys[0]])
    assert verify_ima_signature(sig, "sha256", digest, both).valid


def test_no_keys_is_unknown_key(signed: tuple[bytes, bytes, TrustedKeys]) -> None:
    sig, digest, _ = signed
    assert (
        verify_ima_signature(sig, "sha256", digest, TrustedKeys()).state
        is SignatureState.UNKNOWN_KEY
    )


@pytest.mark.parametrize("empty", [None, b""], ids=["none", "empty"])
def test_absent(empty: bytes | None, signed: tuple[bytes, bytes, TrustedKeys]) -> None:
    _, digest, keys = signed
    assert verify_ima_signature(empty, "sha256", digest, keys).state is SignatureState.ABSENT


_M, _U = SignatureState.MALFORMED, SignatureState.UNSUPPORTED
_BAD_HEADERS = [
    ("fail/short", lambda s: s[:5], _M, "need at least 9"),
    ("fail/size", lambda s: s[:-1], _M, "says 256 bytes, 255"),
    ("fail/trailing", lambda s: s + b"\0", _M, "says 256 bytes, 257"),
    ("fail/empty-sig", lambda s: s[:7] + b"\0\0", _M, "empty signature"),
    ("fail/portable", lambda s: b"\x05" + s[1:], _U, "type 0x05"),
    ("fail/v3", lambda s: s[:1] + b"\x03" + s[2:], _U, "version 3"),
    ("fail/v1", lambda s: s[:1] + b"\x01" + s[2:], _U, "version 1"),
    ("fail/algo-undefined", lambda s: s[:2] + b"\x63" + s[3:], _U, "hash_algo 99"),
    (
        "fail/algo-mismatch",
        lambda s: s[:2] + b"\x02" + s[3:],
        SignatureState.ALGORITHM_MISMATCH,
        "signed with sha1",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "state", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in _BAD_HEADERS],
)
def test_bad_headers(
    mutate, state: SignatureState, message: str, signed: tuple[bytes, bytes, TrustedKeys]
) -> None:  # type: ignore[no-untyped-def]
    sig, digest, keys = signed
    check = verify_ima_signature(mutate(sig), "sha256", digest, keys)
    assert check.state is state
    assert message in check.describe()


def test_md5_signature_is_unsupported(signed: tuple[bytes, bytes, TrustedKeys]) -> None:
    sig, _, keys = signed
    md5 = sig[:2] + b"\x01" + sig[3:]
    check = verify_ima_signature(md5, "md5", hashlib.md5(b"x").digest(), keys)
    assert check.state is SignatureState.UNSUPPORTED
    assert "md5 is not verified" in check.describe()


def test_digest_of_wrong_length_is_malformed(signed: tuple[bytes, bytes, TrustedKeys]) -> None:
    sig, digest, keys = signed
    check = verify_ima_signature(sig, "sha256", digest[:20], keys)
    assert check.state is SignatureState.MALFORMED


def test_sm3_256_alias(signed: tuple[bytes, bytes, TrustedKeys]) -> None:
    sig, digest, keys = signed
    sm3 = sig[:2] + b"\x11" + sig[3:]
    # older kernels print "sm3-256": same algorithm, and cryptography cannot verify it here
    check = verify_ima_signature(sm3, "sm3-256", digest, keys)
    assert check.state is SignatureState.UNSUPPORTED


def test_parse_errors_name_the_field() -> None:
    with pytest.raises(ParseError, match=r"signature_v2_hdr\.sig_size at byte 7"):
        ImaSignatureV2.parse(bytes.fromhex("030204aabbccdd0010") + b"\0" * 4)


def test_trusted_key_rejects_bad_keyid(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="4 bytes"):
        TrustedKey.from_public_key(rsa_key.public_key(), keyid=b"\0")
