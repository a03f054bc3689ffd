"""Signatures a downloader can check with OpenSSF model signing (``model_signing verify``).

Every published repo gets ``model.sig`` at its root: a Sigstore bundle over an in-toto statement
listing every file of the repo with its sha256 (model_signing's own format, file serialization,
sha256: the settings its command line verifies with). Each GGUF file also gets ``<file>.sig``
over that file alone, so a user who downloads one quant type can check it without the others.

The statements are built from the digests the release already holds (hashed while staging for
the Hub), so signing reads no weight byte again. Key signatures use ECDSA P-256 with RFC 6979
nonces: the same files and key give the same ``model.sig`` bytes, so a re-run pushes nothing new.
The private key's path comes from ``--signing-key`` or ``QALB_SIGNING_KEY``; it is never
printed, logged or written anywhere. Keyless signing through Sigstore (an OIDC identity, Fulcio
and Rekor) is the other way, for maintainers online.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from release.errors import ReleaseError

SIGNATURE = "model.sig"  # model_signing's default name: `model_signing verify key REPO --signature REPO/model.sig`
PUBLIC_KEY = "signing-key.pub"  # the release's public key, in every repo
PROVENANCE = "provenance.intoto.json"  # SLSA provenance (release/provenance.py), covered by model.sig
FILE_SIGNATURE = ".sig"  # <file>.sig beside each GGUF file: that file alone
# Not covered: the signature itself, what git and the Hub add, and what `hf download --local-dir`
# writes beside the files (.cache/huggingface/); recorded in the signature, which the verifier
# of model_signing's command line reads.
IGNORED = (SIGNATURE, ".cache", ".git", ".gitattributes", ".github", ".gitignore")
ENV_KEY = "QALB_SIGNING_KEY"
ENV_PASSWORD = "QALB_SIGNING_KEY_PASSWORD"
ENV_IDENTITY_TOKEN = "SIGSTORE_ID_TOKEN"  # keyless: an OIDC token for Fulcio (CI's ambient one otherwise)


class SigningError(ReleaseError):
    """A key that cannot be used, a signature that does not verify, a file that differs."""


@dataclass(frozen=True)
class Key:
    """A private EC key loaded for signing; ``path`` only to name it in errors."""

    path: Path
    private: object  # cryptography's EllipticCurvePrivateKey

    @property
    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_pem)


def fingerprint(public_pem: bytes) -> str:
    """``sha256:<hex>`` of the public key's PEM file: what ``sha256sum signing-key.pub`` prints,
    and the key hint model_signing writes into every signature it makes with that key."""
    return "sha256:" + hashlib.sha256(public_pem).hexdigest()


def key_fingerprint(public_key: Path) -> str:
    """The fingerprint of a public key file as model_signing computes its key hint: of the key
    re-encoded as PEM, so a copy with other line endings has the same fingerprint."""
    from cryptography.hazmat.primitives import serialization

    data = Path(public_key).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        return fingerprint(data)  # not a key: model_signing's verifier says so
    return fingerprint(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def keygen(path: Path) -> tuple[Path, str]:
    """Write a new EC P-256 private key to ``path`` (PKCS#8 PEM, mode 0600, never overwriting) and
    its public key to ``<path>.pub``; return the public key's path and fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise SigningError(f"{p}: already exists; choose another --out (a key is never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    password = os.environ.get(ENV_PASSWORD)
    crypt = (serialization.BestAvailableEncryption(password.encode()) if password
             else serialization.NoEncryption())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    key = Key(path, private)
    pub.write_bytes(key.public_pem)
    return pub, key.fingerprint


def key_path(option: str | os.PathLike | None = None) -> Path | None:
    """The signing key named by ``--signing-key`` or else ``QALB_SIGNING_KEY``; None: unsigned."""
    value = option or os.environ.get(ENV_KEY)
    return Path(value).expanduser() if value else None


KEYLESS = ("sigstore", "sigstore-staging")  # values of QALB_SIGNING_KEY / --signing-key that mean keyless


def from_environment(option: str | None = None) -> Key | Keyless | None:
    """How to sign: the key at ``--signing-key``/``QALB_SIGNING_KEY``, Sigstore keyless when that
    says ``sigstore`` (``sigstore-staging``: Sigstore's staging instance), or None: unsigned."""
    value = option or os.environ.get(ENV_KEY)
    if not value:
        return None
    if value in KEYLESS:
        return Keyless(os.environ.get(ENV_IDENTITY_TOKEN) or None, staging=value.endswith("staging"))
    return load_key(Path(value).expanduser())


def load_key(path: Path) -> Key:
    """The private key at ``path``: EC P-256 (model_signing also takes P-384 and P-521), PEM,
    encrypted with ``QALB_SIGNING_KEY_PASSWORD`` or not."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningError(f"{path}: cannot read the signing key ({e.strerror}); create one with "
                           "./inv keygen --out PATH") from None
    password = os.environ.get(ENV_PASSWORD)
    try:
        private = serialization.load_pem_private_key(data, password.encode() if password else None)
    except TypeError:
        raise SigningError(f"{path}: the signing key is encrypted; set {ENV_PASSWORD}") from None
    except ValueError:
        raise SigningError(f"{path}: not a PEM private key (or a wrong {ENV_PASSWORD}); create one with "
                           "./inv keygen --out PATH") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name not in (
            "secp256r1", "secp384r1", "secp521r1"):
        raise SigningError(f"{path}: not an EC P-256/P-384/P-521 key, which model_signing needs; create one "
                           "with ./inv keygen --out PATH")
    return Key(path, private)


# --- signing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keyless:
    """Sigstore keyless signing: Fulcio certifies an OIDC identity, Rekor logs the signature."""

    identity_token: str | None = None  # None: ambient credentials (CI) or the browser flow
    staging: bool = False


def _manifest(name: str, digests: Mapping[str, str]):
    """model_signing's manifest of files -> sha256, as its file serialization makes it, from
    digests already known."""
    from model_signing import manifest
    from model_signing._hashing import hashing

    items = [manifest.FileManifestItem(path=pathlib.PurePosixPath(p), digest=hashing.Digest("sha256",
                                                                                              bytes.fromhex(d)))
             for p, d in sorted(digests.items())]
    kind = manifest._FileSerialization("sha256", False, [pathlib.Path(p) for p in IGNORED])
    return manifest.Manifest(name, items, kind)


def _signer(key: Key | Keyless):
    from cryptography.hazmat.primitives.asymmetric import ec
    from model_signing._signing import sign_ec_key, sign_sigstore

    if isinstance(key, Keyless):
        return sign_sigstore.Signer(identity_token=key.identity_token, use_staging=key.staging,
                                    use_ambient_credentials=key.identity_token is None)

    class Deterministic(sign_ec_key.Signer):
        """model_signing's EC signer with RFC 6979 nonces: identical statements sign identically."""

        def __init__(self, private):  # noqa: D107 - the key is loaded already
            self._private_key = private

        def sign(self, payload):
            from google.protobuf import json_format
            from model_signing._signing import sign_sigstore_pb, signing
            from sigstore_models import intoto as intoto_pb
            from sigstore_models.bundle import v1 as bundle_pb

            # keys sorted: protobuf's Struct orders them by the process's hash seed, so model_signing's
            # own JSON differs from run to run; any JSON verifies (the signature covers these bytes)
            raw = json.dumps(json_format.MessageToDict(payload.statement.pb), indent=2, sort_keys=True).encode()
            algorithm = ec.ECDSA(sign_ec_key.get_ec_key_hash(self._private_key.public_key()),
                                 deterministic_signing=True)
            sig = self._private_key.sign(sign_sigstore_pb.pae(raw), algorithm)
            envelope = intoto_pb.Envelope(payload=base64.b64encode(raw),
                                          payload_type=signing._IN_TOTO_JSON_PAYLOAD_TYPE,
                                          signatures=[intoto_pb.Signature(sig=base64.b64encode(sig), keyid="")])
            return sign_sigstore_pb.Signature(bundle_pb.Bundle(media_type=sign_sigstore_pb._BUNDLE_MEDIA_TYPE,
                                                               verification_material=self._get_verification_material(),
                                                               dsse_envelope=envelope))

    return Deterministic(key.private)


def sign(dest: Path, name: str, digests: Mapping[str, str], key: Key | Keyless) -> None:
    """Write the signature of ``digests`` (path in the repo -> sha256; for one file, ``{".": sha}``,
    as model_signing names a single-file model) to ``dest``, atomically."""
    from model_signing._signing import signing

    from release.artifacts import atomic_path

    try:
        signature = _signer(key).sign(signing.Payload(_manifest(name, digests)))
    except ReleaseError:
        raise
    except Exception as e:  # noqa: BLE001 - Sigstore's network, OIDC and TUF errors are many; named in one line
        if isinstance(key, Keyless):
            raise SigningError(f"{dest.name}: keyless signing through Sigstore failed ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}); it needs the internet and an OIDC identity "
                               f"({ENV_IDENTITY_TOKEN} or CI's ambient one), or sign with a key "
                               "(--signing-key)") from e
        raise
    with atomic_path(dest) as tmp:
        signature.write(tmp)


# --- reading and verifying ----------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """What a signature says, once its signature is checked."""

    name: str
    digests: dict[str, str]  # path (or ".") -> sha256
    signer: str  # "sha256:<key fingerprint>" or the Sigstore identity
    ignored: tuple[str, ...]


def read(path: Path) -> dict:
    """The bundle at ``path`` as JSON, unverified (for what it names)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SigningError(f"{path}: not a readable signature ({type(e).__name__}); download it again") from None


def key_hint(path: Path) -> str | None:
    """``sha256:<hex>`` of the key that made the signature at ``path`` (its own claim; None for
    a keyless one)."""
    hint = read(path).get("verificationMaterial", {}).get("publicKey", {}).get("hint")
    return f"sha256:{hint}" if hint else None


def verify(path: Path, *, public_key: Path | None = None, identity: str | None = None,
           issuer: str | None = None) -> Signed:
    """Check the signature at ``path`` with ``public_key`` (or, keyless, the Sigstore ``identity``
    and ``issuer``) and return what it signs. Files are compared by the caller."""
    from model_signing._signing import sign_ec_key, sign_sigstore, sign_sigstore_pb

    try:
        if public_key is not None:
            signature = sign_sigstore_pb.Signature.read(Path(path))
            signed = sign_ec_key.Verifier(Path(public_key)).verify(signature)
            signer = key_fingerprint(Path(public_key))
        else:
            signature = sign_sigstore.Signature.read(Path(path))
            signed = sign_sigstore.Verifier(identity=identity, oidc_issuer=issuer).verify(signature)
            signer = identity or ""
    except OSError as e:
        raise SigningError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - model_signing reports a bad signature as ValueError and the
        # cryptography/sigstore errors beneath it; each is one line here
        why = " ".join(str(e).split()) or type(e).__name__
        if "Key mismatch" in why or type(e).__name__ == "InvalidSignature":
            why = (f"signed by key {key_hint(path) or '(none named)'}, not by "
                   f"{key_fingerprint(Path(public_key)) if public_key else identity}")
        raise SigningError(f"{path}: signature does not verify: {why[:300]}") from None
    digests = {d.identifier: d.digest.digest_hex for d in signed.resource_descriptors()}
    kind = signed.serialization_type
    return Signed(signed.model_name, digests, signer, tuple(kind.get("ignore_paths", ())))
