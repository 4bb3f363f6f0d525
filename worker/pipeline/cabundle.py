"""add_ccm_ca_certificates: the service's CA bundle appended to the trust store inside an image tree."""
from __future__ import annotations

from pathlib import Path

from common.errors import CaBundleNotConfigured, InvalidCaBundle
from common.image.filetree import BytesContent, Node, NodeKind, Tree

# Where the common distributions keep the PEM bundle that OpenSSL, curl and most runtimes read:
# Debian/Ubuntu/Alpine, then RHEL/Fedora/Amazon Linux, then the BSD-style path some images use.
TRUST_STORE_PATHS = (
    b"/etc/ssl/certs/ca-certificates.crt",
    b"/etc/pki/tls/certs/ca-bundle.crt",
    b"/etc/ssl/cert.pem",
)
DEFAULT_TRUST_STORE = TRUST_STORE_PATHS[0]


def load_ca_bundle(path: Path | None) -> bytes:
    """The configured bundle's bytes, checked to hold at least one PEM certificate."""
    if path is None:
        raise CaBundleNotConfigured("add_ccm_ca_certificates needs a CA bundle, and this service has none "
                                    "(set NITROCONV_CA_BUNDLE)", details={"field": "add_ccm_ca_certificates"})
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidCaBundle(f"cannot read the CA bundle {str(path)!r}: {exc.strerror or exc}") from exc
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise InvalidCaBundle(f"the CA bundle {str(path)!r} is not PEM certificates: {exc}") from exc
    if not certificates:
        raise InvalidCaBundle(f"the CA bundle {str(path)!r} holds no certificate")
    return data


def append_ca_bundle(tree: Tree, bundle: bytes) -> list[bytes]:
    """Append `bundle` to every trust-store file the image has (each file once, whatever its names).

    Paths resolve inside the tree, so `/etc/ssl/cert.pem -> certs/ca-certificates.crt` is the same
    file and is extended once. A file's new bytes are in-memory content replacing its old content
    reference: the layer blob or spool region it came from is never written to. When the image has
    no bundle at all, one is created at the Debian path. Returns the paths that were extended or made.
    """
    done: list[Node] = []
    changed: list[bytes] = []
    for path in TRUST_STORE_PATHS:
        node = tree.lookup(path)
        if node is None or node.kind is not NodeKind.FILE or any(node is seen for seen in done):
            continue
        done.append(node)
        old = b""
        if node.content is not None:
            with node.content.open() as reader:
                old = reader.read()
        separator = b"" if not old or old.endswith(b"\n") else b"\n"
        node.content = BytesContent(old + separator + bundle)
        changed.append(path)
    if not changed:
        tree.add_file(DEFAULT_TRUST_STORE, BytesContent(bundle), mode=0o644)
        changed.append(DEFAULT_TRUST_STORE)
    return changed
