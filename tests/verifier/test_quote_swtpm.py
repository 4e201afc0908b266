"""verify_quote on evidence tpm2-tools makes on a real swtpm: valid, each attack, tpm2_checkquote.

One swtpm per module (making AKs is the slow part): an RSA EK, AKs of every
kind the swtpm supports, quotes with a nonce over two banks, and the
attacks: a non-restricted signing key and a sign+decrypt key (both accepted
by tpm2_checkquote 5.4), a bad-magic structure signed by the real AK through
a TPM2_Hash ticket, and a TPM2_Certify attestation (type 0x8017) by the AK.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import Tools
from verifier.quote import VerifiedQuote, verify_quote
from vtpm_core.errors import ConfigError, ParseError, VerificationError
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.tpm import Attest, PcrSelection, PcrValues, Public, Signature

pytestmark = pytest.mark.swtpm

NONCE = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
PCR_LIST = "sha1:0,16+sha256:0,1,2,16"
# name -> (tpm2_createak -G, -g, -s); the quote uses the same hash and scheme
AK_KINDS = {
    "rsa-rsassa-sha256": ("rsa", "sha256", "rsassa"),
    "rsa-rsapss-sha256": ("rsa", "sha256", "rsapss"),
    "ecc-ecdsa-sha256": ("ecc", "sha256", "ecdsa"),
    "rsa-rsassa-sha1": ("rsa", "sha1", "rsassa"),
    "rsa-rsassa-sha384": ("rsa", "sha384", "rsassa"),
    "ecc384-ecdsa-sha384": ("ecc384", "sha384", "ecdsa"),
    "rsa-rsassa-sha512": ("rsa", "sha512", "rsassa"),
    "ecc-ecdsa-sha512": ("ecc", "sha512", "ecdsa"),
}
PLAIN_SIGNER = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"
SIGN_DECRYPT = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign|decrypt"


class QuoteLab(Tools):
    """tpm2-tools in one work directory, plus reading its files and tpm2_checkquote."""

    @property
    def dir(self) -> Path:
        return self.cwd

    def read(self, name: str) -> bytes:
        return (self.cwd / name).read_bytes()

    def checkquote(
        self, ak: str, msg: str, sig: str, pcrs: str | None, hash_alg: str, nonce: bytes
    ) -> bool:
        args = [
            "tpm2_checkquote",
            "-u",
            ak,
            "-m",
            msg,
            "-s",
            sig,
            "-g",
            hash_alg,
            "-q",
            nonce.hex(),
        ]
        if pcrs is not None:
            args += ["-f", pcrs]
        return self.run(*args, check=False).returncode == 0


def _build_lab(state: Path, work: Path) -> Iterator[QuoteLab]:
    with SwtpmProcess(state) as tpm:
        lab = QuoteLab(tpm, work)
        lab.run("tpm2_pcrextend", "16:sha256=" + "ab" * 32 + ",sha1=" + "cd" * 20)
        lab.run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
        for name, (key, hash_alg, scheme) in AK_KINDS.items():
            lab.run(
                "tpm2_createak", "-C", "ek.ctx", "-c", f"{name}.ctx", "-G", key, "-g", hash_alg,
                "-s", scheme, "-u", f"{name}.pub", "-n", f"{name}.name",
            )  # fmt: skip
            lab.run(
                "tpm2_quote", "-c", f"{name}.ctx", "-l", PCR_LIST, "-q", NONCE.hex(),
                "-m", f"{name}.msg", "-s", f"{name}.sig", "-o", f"{name}.pcrs", "-g", hash_alg,
                "--scheme", scheme,
            )  # fmt: skip
        # the same kind of quote with the PCRs written in -F values form
        lab.run(
            "tpm2_quote", "-c", "rsa-rsassa-sha256.ctx", "-l", "sha256:0,1,2,16",
            "-q", NONCE.hex(), "-m", "values.msg", "-s", "values.sig", "-o", "values.pcrs",
            "-F", "values", "-g", "sha256",
        )  # fmt: skip
        # keys that must never be accepted as AKs
        lab.run("tpm2_createprimary", "-C", "o", "-c", "prim.ctx")
        for name, attrs in (("plain", PLAIN_SIGNER), ("signdecrypt", SIGN_DECRYPT)):
            lab.run(
                "tpm2_create", "-C", "prim.ctx", "-G", "rsa", "-a", attrs,
                "-u", f"{name}.pub", "-r", f"{name}.priv",
            )  # fmt: skip
            lab.run(
                "tpm2_load", "-C", "prim.ctx", "-u", f"{name}.pub", "-r", f"{name}.priv",
                "-c", f"{name}.ctx",
            )  # fmt: skip
        # 1. the plain signing key signs a forged TPMS_ATTEST claiming a nonce never quoted
        forged = lab.read("rsa-rsassa-sha256.msg").replace(NONCE, b"\x42" * 32)
        (work / "forged.msg").write_bytes(forged)
        lab.run(
            "tpm2_sign",
            "-c",
            "plain.ctx",
            "-g",
            "sha256",
            "-s",
            "rsassa",
            "-o",
            "forged.sig",
            "forged.msg",
        )
        # 2. a real TPM2_Quote by the sign+decrypt key
        lab.run(
            "tpm2_quote", "-c", "signdecrypt.ctx", "-l", "sha256:0,16",
            "-q", NONCE.hex(), "-m", "signdecrypt.msg", "-s", "signdecrypt.sig",
            "-o", "signdecrypt.pcrs", "-g", "sha256",
        )  # fmt: skip
        # 3. the real AK signs a structure with another magic (TPM2_Hash gives a ticket for it)
        bad_magic = b"\xff\x54\x43\x48" + lab.read("rsa-rsassa-sha256.msg")[4:]
        (work / "badmagic.msg").write_bytes(bad_magic)
        lab.run(
            "tpm2_hash",
            "-C",
            "o",
            "-g",
            "sha256",
            "-t",
            "bm.ticket",
            "-o",
            "bm.digest",
            "badmagic.msg",
        )
        lab.run(
            "tpm2_sign", "-c", "rsa-rsassa-sha256.ctx", "-g", "sha256", "-s", "rsassa",
            "-t", "bm.ticket", "-o", "badmagic.sig", "badmagic.msg",
        )  # fmt: skip
        # 4. a TPM2_Certify attestation (type 0x8017) by the real AK (tpm2_certify 5.4 has no -q)
        lab.run(
            "tpm2_certify", "-c", "plain.ctx", "-C", "rsa-rsassa-sha256.ctx", "-g", "sha256",
            "-o", "certify.msg", "-s", "certify.sig", "-f", "tss",
        )  # fmt: skip
        yield lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuoteLab]:
    base = tmp_path_factory.mktemp("quotes")
    yield from _build_lab(base / "state", base)


# --- tpm2_checkquote 5.4, the oracle (and where it is wrong) --------------------------


@pytest.mark.parametrize("kind", [k for k in AK_KINDS if k != "rsa-rsapss-sha256"])
def test_checkquote_accepts_valid_quotes(lab: QuoteLab, kind: str) -> None:
    hash_alg = AK_KINDS[kind][1]
    assert lab.checkquote(
        f"{kind}.pub", f"{kind}.msg", f"{kind}.sig", f"{kind}.pcrs", hash_alg, NONCE
    )


def test_checkquote_accepts_a_forgery_by_a_non_restricted_key(lab: QuoteLab) -> None:
    # the quote claims a nonce the TPM never saw; tpm2_checkquote only checks the signature
    assert lab.checkquote(
        "plain.pub", "forged.msg", "forged.sig", "rsa-rsassa-sha256.pcrs", "sha256", b"\x42" * 32
    )


def test_checkquote_accepts_a_quote_by_a_sign_decrypt_key(lab: QuoteLab) -> None:
    assert lab.checkquote(
        "signdecrypt.pub", "signdecrypt.msg", "signdecrypt.sig", "signdecrypt.pcrs", "sha256", NONCE
    )


# --- verify_quote ----------------------------------------------------------------------


def _pcrs(lab: QuoteLab, name: str) -> PcrValues:
    return PcrValues.load(lab.read(name))


def _verify(
    lab: QuoteLab, ak: str, stem: str, pcrs: PcrValues | None = None, nonce: bytes = NONCE
) -> VerifiedQuote:
    return verify_quote(
        Public.load(lab.read(ak)),
        lab.read(f"{stem}.msg"),
        lab.read(f"{stem}.sig"),
        pcrs if pcrs is not None else _pcrs(lab, f"{stem}.pcrs"),
        nonce,
    )


@pytest.mark.parametrize("kind", list(AK_KINDS), ids=[f"ok/{k}" for k in AK_KINDS])
def test_valid_quotes_verify(lab: QuoteLab, kind: str) -> None:
    quote = _verify(lab, f"{kind}.pub", kind)
    assert str(quote.pcr_selection) == "sha1:0,16+sha256:0,1,2,16"
    assert quote.firmware_version == 0x2019102300163636  # libtpms
    assert quote.clock_info.reset_count >= 0 and quote.clock_info.safe
    # qualifiedSigner is the AK's qualified name: same name algorithm, another digest
    assert quote.qualified_signer[:2] == Public.load(lab.read(f"{kind}.pub")).name()[:2]
    assert quote.pcrs.values["sha1"][16] == hashlib.sha1(b"\0" * 20 + b"\xcd" * 20).digest()
    assert quote.pcrs.values["sha256"][16] == hashlib.sha256(b"\0" * 32 + b"\xab" * 32).digest()
    # tpm2_checkquote agrees, except on RSASSA-PSS (below)
    hash_alg = AK_KINDS[kind][1]
    agrees = lab.checkquote(
        f"{kind}.pub", f"{kind}.msg", f"{kind}.sig", f"{kind}.pcrs", hash_alg, NONCE
    )
    assert agrees == (kind != "rsa-rsapss-sha256")


def test_checkquote_rejects_valid_rsapss_quotes(lab: QuoteLab) -> None:
    """libtpms signs RSASSA-PSS with salt length = digest length (TPM 2.0 Part 1 §B.7 in
    current revisions); tpm2_checkquote 5.4 verifies with another salt length and says
    "Verify signature failed". The signature is valid: it verifies with salt 32."""
    sig = Signature.parse(lab.read("rsa-rsapss-sha256.sig"))
    key = Public.load(lab.read("rsa-rsapss-sha256.pub")).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(
        sig.rsa_signature, lab.read("rsa-rsapss-sha256.msg"),
        padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256(),
    )  # fmt: skip
    assert not lab.checkquote(
        "rsa-rsapss-sha256.pub", "rsa-rsapss-sha256.msg", "rsa-rsapss-sha256.sig",
        "rsa-rsapss-sha256.pcrs", "sha256", NONCE,
    )  # fmt: skip


def test_values_form_is_read_against_the_quotes_selection(lab: QuoteLab) -> None:
    attest = Attest.parse(lab.read("values.msg"))
    pcrs = PcrValues.load(lab.read("values.pcrs"), attest.attested.pcr_select)
    quote = verify_quote(
        Public.load(lab.read("rsa-rsassa-sha256.pub")),
        lab.read("values.msg"),
        lab.read("values.sig"),
        pcrs,
        NONCE,
    )
    assert str(quote.pcr_selection) == "sha256:0,1,2,16"


def _relabel(pcrs: PcrValues, bank: str, old: int, new: int) -> PcrValues:
    values = pcrs.as_mapping()
    values[bank][new] = values[bank].pop(old)
    return PcrValues(values)


def _tamper(pcrs: PcrValues, bank: str, index: int) -> PcrValues:
    values = pcrs.as_mapping()
    values[bank][index] = bytes(len(values[bank][index]))[:-1] + b"\x01"
    return PcrValues(values)


def _drop_bank(pcrs: PcrValues, bank: str) -> PcrValues:
    return PcrValues({b: v for b, v in pcrs.as_mapping().items() if b != bank})


GOOD = "rsa-rsassa-sha256"
GOOD_AK = f"{GOOD}.pub"
OTHER = b"\x42" * 32
SAME = None  # keep the good quote's PCR values
FAILURES = [
    # id, ak file, evidence stem, pcrs transform, nonce, check, message pattern
    ("fail/nonce/other-value", GOOD_AK, GOOD, SAME, OTHER, "quote.nonce",
     r"nonce mismatch \(same length \(32 bytes\), different value\)"),
    ("fail/nonce/other-length", GOOD_AK, GOOD, SAME, NONCE[:8], "quote.nonce",
     r"nonce mismatch \(got 32 bytes, expected 8\)"),
    ("fail/pcr_select/relabelled", GOOD_AK, GOOD, lambda p: _relabel(p, "sha256", 16, 17),
     NONCE, "quote.pcr_select", r"the quote selects sha1:0,16\+sha256:0,1,2,16,"
     r" the PCR values supplied are sha1:0,16\+sha256:0,1,2,17"),
    ("fail/pcr_select/bank-missing", GOOD_AK, GOOD, lambda p: _drop_bank(p, "sha1"),
     NONCE, "quote.pcr_select", r"supplied are sha256:0,1,2,16"),
    ("fail/pcr_digest/tampered-value", GOOD_AK, GOOD, lambda p: _tamper(p, "sha256", 16),
     NONCE, "quote.pcr_digest", r"sha256 digest of the supplied PCR values"),
    ("fail/signature/other-ak", "rsa-rsassa-sha1.pub", GOOD, SAME, NONCE,
     "quote.signature", r"rsassa/sha256 signature does not verify with the key"),
    ("fail/signature/ecc-ak-for-rsa-quote", "ecc-ecdsa-sha256.pub", GOOD, SAME, NONCE,
     "quote.signature", r"rsassa signature but the key is not RSA"),
    ("fail/ak/non-restricted-forgery", "plain.pub", "forged", SAME, OTHER,
     "ak.attributes", r"AK lacks restricted \(attributes 0x00040072\)"),
    ("fail/ak/sign-decrypt", "signdecrypt.pub", "signdecrypt", SAME, NONCE,
     "ak.attributes", r"AK lacks restricted \(attributes 0x00060072\)"),
    ("fail/ak/ek-as-ak", "ek.pub", GOOD, SAME, NONCE, "ak.attributes", r"AK lacks sign"),
    ("fail/magic/signed-by-real-ak", GOOD_AK, "badmagic", SAME, NONCE,
     "quote.magic", r"magic 0xff544348, expected 0xff544347"),
    ("fail/type/certify-by-real-ak", GOOD_AK, "certify", SAME, NONCE,
     "quote.type", r"type 0x8017, expected 0x8018"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("ak", "stem", "transform", "nonce", "check", "match"),
    [pytest.param(*case[1:], id=case[0]) for case in FAILURES],
)
def test_attacks_fail_with_the_named_check(
    lab: QuoteLab, ak: str, stem: str, transform: object, nonce: bytes, check: str, match: str
) -> None:
    pcrs = _pcrs(lab, f"{GOOD}.pcrs")
    if transform is not None:
        pcrs = transform(pcrs)  # type: ignore[operator]
    with pytest.raises(VerificationError, match=match) as info:
        verify_quote(
            Public.load(lab.read(ak)), lab.read(f"{stem}.msg"), lab.read(f"{stem}.sig"), pcrs, nonce
        )
    assert info.value.check == check


def test_relabelling_keeps_the_digest(lab: QuoteLab) -> None:
    """Why quote.pcr_select exists: the relabelled values hash to the quoted pcrDigest."""
    attest = Attest.parse(lab.read(f"{GOOD}.msg"))
    relabelled = _relabel(_pcrs(lab, f"{GOOD}.pcrs"), "sha256", 16, 17)
    order = PcrSelection.from_string("sha1:0,16+sha256:0,1,2,17")
    assert relabelled.digest(order, "sha256") == attest.attested.pcr_digest


def test_we_refuse_what_checkquote_accepts(lab: QuoteLab) -> None:
    assert lab.checkquote(
        "plain.pub", "forged.msg", "forged.sig", f"{GOOD}.pcrs", "sha256", b"\x42" * 32
    )
    with pytest.raises(VerificationError, match=r"^ak\.attributes: "):
        verify_quote(
            Public.load(lab.read("plain.pub")), lab.read("forged.msg"), lab.read("forged.sig"),
            _pcrs(lab, f"{GOOD}.pcrs"), b"\x42" * 32,
        )  # fmt: skip
    # and without the attribute check the forgery would pass every other check
    forged = verify_quote(
        Public.load(lab.read("plain.pub")), lab.read("forged.msg"), lab.read("forged.sig"),
        _pcrs(lab, f"{GOOD}.pcrs"), b"\x42" * 32, require_ak_attributes=False,
    )  # fmt: skip
    assert forged.attest.extra_data == b"\x42" * 32


def test_bare_key_needs_the_explicit_option(lab: QuoteLab) -> None:
    key = Public.load(lab.read(f"{GOOD}.pub")).public_key()
    args = (lab.read(f"{GOOD}.msg"), lab.read(f"{GOOD}.sig"), _pcrs(lab, f"{GOOD}.pcrs"), NONCE)
    with pytest.raises(VerificationError, match=r"^ak\.attributes: only a public key was given"):
        verify_quote(key, *args)
    assert not verify_quote(key, *args, require_ak_attributes=False).ak_attributes_checked


def test_tampered_message_fails_the_signature(lab: QuoteLab) -> None:
    msg = bytearray(lab.read(f"{GOOD}.msg"))
    msg[-40] ^= 1
    with pytest.raises(VerificationError, match=r"^quote\.signature: "):
        verify_quote(Public.load(lab.read(f"{GOOD}.pub")), bytes(msg), lab.read(f"{GOOD}.sig"),
                     _pcrs(lab, f"{GOOD}.pcrs"), NONCE)  # fmt: skip


def test_malformed_inputs_are_parse_errors(lab: QuoteLab) -> None:
    ak = Public.load(lab.read(f"{GOOD}.pub"))
    sig = lab.read(f"{GOOD}.sig")
    with pytest.raises(
        ParseError,
        match=r"TPMT_SIGNATURE\.signature\.rsa\.sig\.buffer at byte 6: truncated: need 256 bytes",
    ):
        verify_quote(ak, lab.read(f"{GOOD}.msg"), sig[:206], _pcrs(lab, f"{GOOD}.pcrs"), NONCE)
    with pytest.raises(ParseError, match=r"TPMT_PUBLIC"):
        Public.load(lab.read(f"{GOOD}.pub")[:-10])
    with pytest.raises(ConfigError, match="empty nonce"):
        verify_quote(ak, lab.read(f"{GOOD}.msg"), sig, _pcrs(lab, f"{GOOD}.pcrs"), b"")
