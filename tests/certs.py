"""Throw-away X.509 material for tests that speak TLS (Redis, the IdP double).

``make_ca_and_certs(tmpdir)`` creates a CA, a server certificate for 127.0.0.1
/ localhost and a client certificate (for mutual TLS), all signed by that CA,
and returns every piece both as a PEM string and as a file path. Call it twice
(two directories) to get an unrelated CA for "wrong CA" tests.
"""

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Dict, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "oauth2-introspection tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject_cn, subject_key, issuer_name, issuer_key, *, ca=False, eku=None,
           san=None, issuer_ski=None, days=2):
    now = datetime.datetime.now(datetime.timezone.utc)
    pub = subject_key.public_key()
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject_cn))
               .issuer_name(issuer_name or _name(subject_cn))
               .public_key(pub)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=True, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False), critical=True)
    if issuer_ski is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca_and_certs(tmpdir: Union[str, os.PathLike], *, ca_name: str = "Test CA"
                      ) -> Dict[str, str]:
    """A CA plus server and client certificates, written (0600) under ``tmpdir``.

    Keys of the result: ``ca``, ``ca_key``, ``server_cert``, ``server_key``,
    ``client_cert``, ``client_key`` (PEM strings) and the same names with a
    ``_path`` suffix (files). The server certificate is valid for IP
    127.0.0.1, IP ::1 and DNS localhost.
    """
    out_dir = Path(tmpdir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ca_key = _key()
    ca_cert = _issue(ca_name, ca_key, None, ca_key, ca=True)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    server_key = _key()
    server_cert = _issue("127.0.0.1", server_key, ca_cert.subject, ca_key,
                         eku=[ExtendedKeyUsageOID.SERVER_AUTH], issuer_ski=ca_ski,
                         san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                              x509.IPAddress(ipaddress.ip_address("::1")),
                              x509.DNSName("localhost")])

    client_key = _key()
    client_cert = _issue("test-client", client_key, ca_cert.subject, ca_key,
                         eku=[ExtendedKeyUsageOID.CLIENT_AUTH], issuer_ski=ca_ski)

    pems = {
        "ca": _cert_pem(ca_cert),
        "ca_key": _key_pem(ca_key),
        "server_cert": _cert_pem(server_cert),
        "server_key": _key_pem(server_key),
        "client_cert": _cert_pem(client_cert),
        "client_key": _key_pem(client_key),
    }
    result = dict(pems)
    for name, pem in pems.items():
        path = out_dir / f"{name}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pem)
        result[name + "_path"] = str(path)
    return result
