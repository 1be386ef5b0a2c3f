//! A throw-away certificate authority for tests.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A self-signed test certificate authority (ECDSA P-256, generated with rcgen).
///
/// Its certificate is available as PEM (`cert_pem`) and as a file
/// (`cert_path`) inside a temporary directory owned by the `TestCa`; the
/// directory is deleted when the last clone of the `TestCa` is dropped.
/// Cloning is cheap and shares the same key, certificate and directory.
#[derive(Clone)]
pub struct TestCa {
    /// The CA certificate, PEM encoded.
    pub cert_pem: String,
    /// A file containing `cert_pem` (for tools such as curl's `--cacert`, or
    /// edgepool's upstream CA option).
    pub cert_path: PathBuf,
    inner: Arc<CaInner>,
}

struct CaInner {
    dir: tempfile::TempDir,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A leaf certificate issued by a [`TestCa`].
pub struct Leaf {
    /// The leaf certificate, PEM encoded.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key, PEM encoded.
    pub key_pem: String,
    /// The leaf certificate, DER encoded.
    pub cert_der: CertificateDer<'static>,
    /// The leaf's private key, PKCS#8 DER encoded.
    pub key_der: PrivateKeyDer<'static>,
}

impl TestCa {
    /// Generates a new CA (ECDSA P-256) and writes its certificate to
    /// `<tempdir>/ca.pem`.
    pub fn new() -> TestCa {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "edgepool test CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "edgepool tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign CA");
        let cert_pem = cert.pem();
        let dir = tempfile::Builder::new()
            .prefix("edgepool-test-ca")
            .tempdir()
            .expect("create CA tempdir");
        let cert_path = dir.path().join("ca.pem");
        std::fs::write(&cert_path, &cert_pem).expect("write ca.pem");
        TestCa {
            cert_pem,
            cert_path,
            inner: Arc::new(CaInner { dir, cert, key }),
        }
    }

    /// The CA certificate, DER encoded.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.inner.cert.der().clone()
    }

    /// The temporary directory owned by this CA (holds `ca.pem` and any files
    /// written by [`TestCa::write_leaf_files`]).
    pub fn dir(&self) -> PathBuf {
        self.inner.dir.path().to_path_buf()
    }

    /// Issues a fresh leaf certificate (new ECDSA P-256 key) for `names`.
    ///
    /// Each name becomes a subjectAltName: IP literals (`"127.0.0.1"`,
    /// `"::1"`) become IP SANs, everything else a DNS SAN. The first name is
    /// also the subject CN. Extended key usage: serverAuth and clientAuth.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        assert!(
            !names.is_empty(),
            "a leaf certificate needs at least one name"
        );
        let key = KeyPair::generate().expect("generate leaf key");
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.inner.cert, &self.inner.key)
            .expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// Issues a leaf for `names` and writes it to `<file_stem>.crt` and
    /// `<file_stem>.key` (PEM) in the CA's temporary directory, for external
    /// servers such as nginx. Returns `(cert_path, key_path)`.
    pub fn write_leaf_files(&self, file_stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let leaf = self.leaf(names);
        let cert_path = self.inner.dir.path().join(format!("{file_stem}.crt"));
        let key_path = self.inner.dir.path().join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, &leaf.cert_pem).expect("write leaf cert");
        std::fs::write(&key_path, &leaf.key_pem).expect("write leaf key");
        (cert_path, key_path)
    }

    /// A rustls server configuration presenting a fresh leaf for `names`
    /// (e.g. `&["localhost", "127.0.0.1", "::1"]`) signed by this CA, offering
    /// the ALPN protocols `alpn` in order of preference (e.g.
    /// `&[b"h2", b"http/1.1"]`; empty = no ALPN). Uses the ring provider and
    /// rustls' safe default protocol versions (TLS 1.2 and 1.3).
    pub fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let leaf = self.leaf(names);
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.cert_der], leaf.key_der)
        .expect("server cert");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A root store that trusts only this CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der()).expect("add CA to root store");
        roots
    }

    /// A rustls client configuration trusting only this CA, offering `alpn`
    /// (empty = no ALPN). Ring provider, safe default protocol versions.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(self.root_store())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A `reqwest::Certificate` for this CA, for
    /// `reqwest::ClientBuilder::add_root_certificate`.
    pub fn reqwest_certificate(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).expect("CA PEM for reqwest")
    }
}
