//! The interception certificate authority: loads (or creates on first run) the
//! local CA that edgepool uses to terminate TLS inside `CONNECT` tunnels, and
//! mints short-lived per-host leaf certificates signed by it, each wrapped in a
//! ready-to-use, cached [`rustls::ServerConfig`].
//!
//! Files live in the data directory: `ca.pem` (the certificate, to be trusted by
//! the workers) and `ca-key.pem` (the private key, mode `0600`, refused if group
//! or others can access it).

#![deny(missing_docs)]

use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lru::LruCache;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, BmpString, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PrintableString, SanType, SerialNumber, TeletexString, UniversalString,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

/// File name of the CA certificate inside the data directory.
const CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the data directory.
const KEY_FILE: &str = "ca-key.pem";
/// Lifetime of a newly created CA (10 years).
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// How far a new CA's `notBefore` is set in the past, to tolerate client clock skew.
const CA_BACKDATE: time::Duration = time::Duration::days(1);
/// How far a leaf's `notBefore` is set in the past, to tolerate client clock skew.
const LEAF_BACKDATE: time::Duration = time::Duration::hours(1);
/// Upper bound (RFC 5280 `ub-common-name`) for the leaf's CN; longer hosts get no CN.
const MAX_CN_LEN: usize = 64;
/// Number of TLS 1.2 session-id entries shared by all leaf configs.
const SESSION_CACHE_SIZE: usize = 4096;

/// Errors from the CA module; messages name the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading, writing or creating a file or directory failed (this includes a
    /// CA certificate whose key file is missing, and vice versa).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The CA key file can be accessed by group or others.
    #[error(
        "{}: private key is accessible by group or others (mode {mode:04o}); \
         run `chmod 600 {}` and restart",
        path.display(),
        path.display()
    )]
    InsecureKeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits (e.g. `0o644`).
        mode: u32,
    },
    /// A CA file exists but its content is unusable (malformed PEM/DER, key not
    /// matching the certificate, not a CA, expired...).
    #[error("{}: {reason}", path.display())]
    Parse {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        reason: CaFileError,
    },
    /// rcgen failed to generate a key or to sign a certificate.
    #[error("certificate generation failed: {what}: {source}")]
    Generate {
        /// What was being generated (`CA key`, `leaf certificate`, ...).
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused to build a leaf's TLS server config.
    #[error("certificate generation failed: {what}: {source}")]
    ServerConfig {
        /// Which step failed (`TLS versions`, `TLS server config`).
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// The issuer handle rebuilt from a loaded CA does not parse back.
    #[error("certificate generation failed: CA issuer handle: {0}")]
    IssuerHandle(#[source] DerError),
    /// The system random number generator failed.
    #[error("certificate generation failed: system random number generator failed")]
    Random,
    /// The host given to [`LeafCache::server_config`] is neither a valid DNS name
    /// nor an IP literal.
    #[error("cannot issue a certificate for host {host:?}: {reason}")]
    InvalidHost {
        /// The host as given.
        host: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

/// What is wrong with the content of a CA file ([`CaError::Parse`] names the file).
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The key path is not a regular file.
    #[error("not a regular file")]
    NotAFile,
    /// The key file is not a PEM private key rcgen can use.
    #[error("not a usable PEM private key: {0}")]
    Key(#[source] rcgen::Error),
    /// The certificate file is not valid PEM.
    #[error("invalid PEM: {0}")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// The certificate file holds no or several certificates.
    #[error("expected exactly one CERTIFICATE block, found {0}")]
    CertificateCount(usize),
    /// The certificate's DER does not parse.
    #[error("invalid certificate: {0}")]
    Certificate(#[source] DerError),
    /// An extension (basicConstraints, subjectKeyIdentifier) does not parse.
    #[error("{0}")]
    Extension(#[source] DerError),
    /// The subject name does not parse or cannot be represented.
    #[error("subject: {0}")]
    Subject(#[source] DerError),
    /// The certificate's public key is not the key file's.
    #[error("certificate does not match the private key in {}", key.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
    },
    /// basicConstraints is missing or says CA:FALSE.
    #[error("not a CA certificate (basicConstraints CA:FALSE or missing)")]
    NotCa,
    /// The CA certificate has expired.
    #[error(
        "CA certificate expired on {not_after}; delete {} and {} to create a new CA \
         (workers must then trust the new one)",
        cert.display(),
        key.display()
    )]
    Expired {
        /// Its notAfter.
        not_after: OffsetDateTime,
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rcgen would re-encode the subject differently, so leaves would not chain.
    #[error("subject name uses an encoding this tool cannot reproduce")]
    SubjectEncoding,
}

/// What is wrong with DER this module reads (a CA certificate, its names and extensions).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DerError {
    /// The input ends inside an element (`part`: tag, length or value).
    #[error("truncated DER ({part})")]
    Truncated {
        /// Which part of the element is missing.
        part: &'static str,
    },
    /// A high-tag-number tag (not used by X.509).
    #[error("unsupported DER multi-byte tag")]
    MultiByteTag,
    /// A length that is indefinite, too long or past the end.
    #[error("invalid DER length")]
    Length,
    /// A named field failed to read.
    #[error("{what}: {source}")]
    Field {
        /// The field (`subject`, `validity`, ...).
        what: &'static str,
        /// Why.
        #[source]
        source: Box<DerError>,
    },
    /// A named field has the wrong tag.
    #[error("{what}: expected DER tag 0x{expected:02x}, found 0x{found:02x}")]
    Tag {
        /// The field.
        what: &'static str,
        /// The tag required.
        expected: u8,
        /// The tag found.
        found: u8,
    },
    /// Content follows the certificate.
    #[error("trailing data after the certificate")]
    TrailingData,
    /// The serial number is not an INTEGER.
    #[error("serial number: expected INTEGER")]
    Serial,
    /// An extension's value is not an OCTET STRING.
    #[error("extension value: expected OCTET STRING")]
    ExtensionValue,
    /// basicConstraints holds something other than cA and pathLenConstraint.
    #[error("basicConstraints: unexpected field")]
    BasicConstraints,
    /// Empty OID or OID with an unterminated arc.
    #[error("malformed OID")]
    Oid,
    /// An OID arc beyond 64 bits.
    #[error("OID arc too large")]
    OidArc,
    /// A time whose content is not ASCII.
    #[error("time is not ASCII")]
    TimeNotAscii,
    /// A time not in UTC (`Z`).
    #[error("time must end in Z")]
    TimeNotUtc,
    /// A time with non-digits.
    #[error("malformed time {0:?}")]
    TimeMalformed(String),
    /// A time of the wrong length for its type.
    #[error("unsupported time encoding {0:?}")]
    TimeEncoding(String),
    /// A time that is not a calendar date and time.
    #[error("invalid time {text:?}")]
    TimeInvalid {
        /// The time as encoded.
        text: String,
        /// Which component is out of range.
        #[source]
        source: time::error::ComponentRange,
    },
    /// A name with a multi-valued RDN (rcgen cannot represent it).
    #[error("multi-valued RDNs are not supported")]
    MultiValuedRdn,
    /// A name attribute value that is not UTF-8.
    #[error("attribute value is not UTF-8")]
    AttributeNotUtf8,
    /// A name attribute value rcgen refuses.
    #[error("attribute value: {0}")]
    AttributeValue(#[source] rcgen::Error),
    /// A name attribute of a string type rcgen cannot represent.
    #[error("unsupported attribute string type (DER tag 0x{0:02x})")]
    AttributeType(u8),
    /// A name with the same attribute type twice (rcgen cannot represent it).
    #[error("repeated attribute types are not supported")]
    RepeatedAttribute,
}

/// The local certificate authority used to sign interception leaves.
pub struct CertAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// rcgen handle carrying the CA's subject name and key identifier, used as
    /// issuer when signing leaves. When the CA was loaded from disk this is a
    /// re-signed copy whose own DER is never published.
    issuer: rcgen::Certificate,
    key: KeyPair,
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field(
                "subject_cn",
                &self
                    .issuer
                    .params()
                    .distinguished_name
                    .get(&DnType::CommonName),
            )
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Path of the CA certificate inside a data dir: `<dir>/ca.pem`.
    pub fn cert_path(data_dir: &Path) -> PathBuf {
        data_dir.join(CERT_FILE)
    }

    /// Path of the key: `<dir>/ca-key.pem`.
    pub fn key_path(data_dir: &Path) -> PathBuf {
        data_dir.join(KEY_FILE)
    }

    /// Loads the CA from the data dir, or creates it on first run (creating the
    /// dir, mode 0700).
    ///
    /// The key file is written with mode 0600 (created with that mode, never
    /// world-readable even briefly); both files are written to a temporary name
    /// and renamed into place. Refuses
    /// ([`CaError::InsecureKeyPermissions`]) to load a key file accessible by
    /// group or others. If only one of the two files exists, nothing is
    /// overwritten and an error says which file is missing.
    ///
    /// The CA: ECDSA P-256, basicConstraints CA:TRUE pathlen:0, keyUsage
    /// keyCertSign+cRLSign (critical), a unique subject per install
    /// (CN "edgepool interception CA <8 random hex chars>", O "edgepool"),
    /// valid 10 years, backdated 1 day.
    ///
    /// Safe against two instances creating the CA in one empty data dir at the same moment:
    /// files are linked into place, never renamed over, so the first one wins and the other
    /// loads it (instances sharing a data dir share one CA).
    pub fn load_or_create(data_dir: &Path) -> Result<Self, CaError> {
        let cert_path = Self::cert_path(data_dir);
        let key_path = Self::key_path(data_dir);
        match (path_exists(&cert_path)?, path_exists(&key_path)?) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(data_dir, &cert_path, &key_path),
            (true, false) => Err(CaError::Io {
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "CA private key is missing although {} exists; restore the key, \
                         or delete {} to create a new CA (workers must then trust the new one)",
                        cert_path.display(),
                        cert_path.display()
                    ),
                ),
                path: key_path,
            }),
            // Another instance sharing the data dir may be between writing its key and its
            // certificate (the key goes first): a key younger than that window is waited for.
            (false, true) if recently_written(&key_path) => {
                Self::load_when_complete(&cert_path, &key_path)
            }
            (false, true) => Err(missing_cert(&cert_path, &key_path)),
        }
    }

    /// Loads the CA from the data dir, never creating one (`edgepool ca path|export`): with
    /// no CA there, the error says so and how to get one.
    pub fn load_existing(data_dir: &Path) -> Result<Self, CaError> {
        let cert_path = Self::cert_path(data_dir);
        let key_path = Self::key_path(data_dir);
        if !path_exists(&cert_path)? && !path_exists(&key_path)? {
            return Err(CaError::Io {
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no CA in the data dir {}: `edgepool serve` creates one on its first \
                         start; if your gateway runs with another data dir, pass --data-dir or \
                         --config",
                        data_dir.display()
                    ),
                ),
                path: cert_path,
            });
        }
        Self::load_or_create(data_dir)
    }

    /// A secret the gateways of one fleet share because they share this CA: SHA-256 of a
    /// label and the CA's private key. It keys the fleet's rendezvous choice of exits
    /// ([`crate::exits::SessionChoice::Rendezvous`]); the key itself never leaves the CA.
    pub fn fleet_key(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"edgepool fleet key v1\0");
        ctx.update(&self.key.serialize_der());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    fn create(data_dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|source| CaError::Io {
                path: data_dir.to_owned(),
                source,
            })?;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            CaError::Generate {
                what: "CA key",
                source,
            }
        })?;
        let mut suffix = [0u8; 4];
        random_fill(&mut suffix)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("edgepool interception CA {}", hex(&suffix)),
        );
        dn.push(DnType::OrganizationName, "edgepool");
        let now = now_utc_secs();
        let params = ca_params(
            dn,
            now - CA_BACKDATE,
            now + CA_VALIDITY,
            KeyIdMethod::Sha256,
        )?;
        let not_after = params.not_after;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CaError::Generate {
                what: "CA certificate",
                source,
            })?;
        let cert_der = cert.der().clone();
        let cert_pem = pem_encode_cert(&cert_der);

        // Key first: a crash in between leaves a key without certificate,
        // which is reported on the next start rather than silently replaced. Another instance
        // that got there first (its key is in place) wins: load its CA once its certificate
        // is written.
        match write_new_file(key_path, key.serialize_pem().as_bytes(), 0o600) {
            Err(CaError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                return Self::load_when_complete(cert_path, key_path);
            }
            r => r?,
        }
        write_new_file(cert_path, cert_pem.as_bytes(), 0o644)?;
        // Best effort: make the renames durable.
        if let Ok(dir) = File::open(data_dir) {
            let _ = dir.sync_all();
        }

        Ok(Self {
            cert_pem,
            cert_der,
            issuer: cert,
            key,
            not_after,
        })
    }

    /// Waits (up to 10 s) for another instance to finish writing the CA, then loads it.
    #[allow(clippy::disallowed_methods)] // sync startup API: waits for another process in wall time
    fn load_when_complete(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !path_exists(cert_path)? {
            if std::time::Instant::now() >= deadline {
                return Err(missing_cert(cert_path, key_path));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self::load(cert_path, key_path)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let key_io = |source| CaError::Io {
            path: key_path.to_owned(),
            source,
        };
        let key_err = |reason: CaFileError| CaError::Parse {
            path: key_path.to_owned(),
            reason,
        };
        let cert_err = |reason: CaFileError| CaError::Parse {
            path: cert_path.to_owned(),
            reason,
        };

        // Check the permissions on the opened file itself (no check/open race).
        let mut key_file = File::open(key_path).map_err(key_io)?;
        let meta = key_file.metadata().map_err(key_io)?;
        if !meta.is_file() {
            return Err(key_err(CaFileError::NotAFile));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CaError::InsecureKeyPermissions {
                path: key_path.to_owned(),
                mode,
            });
        }
        let mut key_pem = String::new();
        key_file.read_to_string(&mut key_pem).map_err(key_io)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| key_err(CaFileError::Key(e)))?;

        let cert_bytes = fs::read(cert_path).map_err(|source| CaError::Io {
            path: cert_path.to_owned(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(&cert_bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_err(CaFileError::Pem(e)))?;
        let cert_der = match <[CertificateDer<'static>; 1]>::try_from(certs) {
            Ok([der]) => der,
            Err(certs) => return Err(cert_err(CaFileError::CertificateCount(certs.len()))),
        };
        let parsed =
            ParsedCert::parse(&cert_der).map_err(|e| cert_err(CaFileError::Certificate(e)))?;

        if parsed.spki != key.public_key_der().as_slice() {
            return Err(cert_err(CaFileError::KeyMismatch {
                key: key_path.to_owned(),
            }));
        }
        match parsed
            .basic_constraints()
            .map_err(|e| cert_err(CaFileError::Extension(e)))?
        {
            Some((true, _)) => {}
            _ => return Err(cert_err(CaFileError::NotCa)),
        }
        if parsed.not_after <= OffsetDateTime::now_utc() {
            return Err(cert_err(CaFileError::Expired {
                not_after: parsed.not_after,
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            }));
        }

        // Rebuild an rcgen issuer handle with the same subject and key identifier.
        let dn = parse_name(parsed.subject).map_err(|e| cert_err(CaFileError::Subject(e)))?;
        let key_id = match parsed
            .subject_key_id()
            .map_err(|e| cert_err(CaFileError::Extension(e)))?
        {
            Some(id) => KeyIdMethod::PreSpecified(id.to_vec()),
            None => KeyIdMethod::Sha256,
        };
        let issuer = ca_params(dn, parsed.not_before, parsed.not_after, key_id)?
            .self_signed(&key)
            .map_err(|source| CaError::Generate {
                what: "CA issuer handle",
                source,
            })?;
        // Leaves carry the issuer name re-encoded by rcgen; it must be
        // byte-identical to the stored certificate's subject or chains break.
        let reencoded = ParsedCert::parse(issuer.der()).map_err(CaError::IssuerHandle)?;
        if reencoded.subject != parsed.subject {
            return Err(cert_err(CaFileError::SubjectEncoding));
        }

        let not_after = parsed.not_after;
        Ok(Self {
            cert_pem: pem_encode_cert(&cert_der),
            cert_der,
            issuer,
            key,
            not_after,
        })
    }
}

/// Parameters shared by a newly created CA and by the issuer handle rebuilt
/// when loading one.
fn ca_params(
    dn: DistinguishedName,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    key_id: KeyIdMethod,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.key_identifier_method = key_id;
    Ok(params)
}

/// Leaf certificates for intercepted hosts, each wrapped in a ready rustls
/// `ServerConfig`.
pub struct LeafCache {
    factory: LeafFactory,
    entries: Mutex<LruCache<String, Arc<Slot>>>,
    metrics: LeafMetrics,
}

/// Lookup outcome label of `edgepool_leaf_cache_lookups_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct LookupLabels {
    result: &'static str,
}

/// The leaf cache's figures: lookups by result (handles looked up once), hosts dropped to stay
/// within the bound, hosts held.
struct LeafMetrics {
    lookups: Family<LookupLabels, Counter>,
    hit: Counter,
    miss: Counter,
    expired: Counter,
    evictions: Counter,
    hosts: Gauge,
}

impl LeafMetrics {
    fn new() -> Self {
        let lookups = Family::<LookupLabels, Counter>::default();
        let handle = |result| lookups.get_or_create(&LookupLabels { result }).clone();
        let (hit, miss, expired) = (handle("hit"), handle("miss"), handle("expired"));
        LeafMetrics {
            lookups,
            hit,
            miss,
            expired,
            evictions: Counter::default(),
            hosts: Gauge::default(),
        }
    }
}

/// One cache entry; initialised once by whichever caller gets there first,
/// the others await the same initialisation.
type Slot = OnceCell<Leaf>;

struct Leaf {
    config: Arc<ServerConfig>,
    /// From this instant on the entry is stale and a new leaf is generated.
    refresh_at: OffsetDateTime,
}

/// Everything needed to mint a leaf.
struct LeafFactory {
    ca: Arc<CertAuthority>,
    provider: Arc<CryptoProvider>,
    validity: Duration,
    alpn: Vec<Vec<u8>>,
    session_storage: Arc<dyn StoresServerSessions>,
    ticketer: Option<Arc<dyn ProducesTickets>>,
    generated: AtomicU64,
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.entries.lock();
        f.debug_struct("LeafCache")
            .field("len", &entries.len())
            .field("capacity", &entries.cap())
            .field("validity", &self.factory.validity)
            .field("generated", &self.generated())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// capacity: max hosts kept (LRU; 0 is treated as 1). validity: leaf
    /// lifetime (short, callers typically pass 7 days; never beyond the CA's
    /// own expiry); leaves are backdated 1 hour.
    /// alpn: protocols offered to workers, e.g.
    /// `vec![b"h2".to_vec(), b"http/1.1".to_vec()]`.
    ///
    /// All configs share one TLS 1.2 session cache and one rotating ticket key
    /// (rustls refuses to resume a session under a different SNI).
    pub fn new(
        ca: Arc<CertAuthority>,
        capacity: usize,
        validity: Duration,
        alpn: Vec<Vec<u8>>,
    ) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        // Ticketer::new only fails if the system RNG fails; then tickets are
        // simply not offered (stateful resumption still works).
        let ticketer = rustls::crypto::ring::Ticketer::new().ok();
        Self {
            factory: LeafFactory {
                ca,
                provider: Arc::new(rustls::crypto::ring::default_provider()),
                validity,
                alpn,
                session_storage: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
                ticketer,
                generated: AtomicU64::new(0),
            },
            entries: Mutex::new(LruCache::new(capacity)),
            metrics: LeafMetrics::new(),
        }
    }

    /// Registers the cache's metrics in `registry`: lookups by result (`hit`: a fresh leaf or
    /// one being made; `miss`: none for the host; `expired`: too close to its end, made anew),
    /// evictions (a host dropped to stay within `intercept.leaf_cache_size`) and hosts held.
    /// The hit rate is `hit / (hit + miss + expired)`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "edgepool_leaf_cache_lookups",
            "Leaf certificate lookups for intercepted hosts, by result: hit (cached), miss (generated), expired (regenerated)",
            m.lookups.clone(),
        );
        registry.register(
            "edgepool_leaf_cache_evictions",
            "Hosts whose leaf certificate was dropped to keep the cache within intercept.leaf_cache_size",
            m.evictions.clone(),
        );
        registry.register(
            "edgepool_leaf_cache_hosts",
            "Hosts with a cached leaf certificate",
            m.hosts.clone(),
        );
    }

    /// The server config for `host` (a DNS name or an IP literal; IPv6 may come
    /// with or without brackets; no port). DNS names are matched
    /// case-insensitively and a trailing dot is ignored.
    ///
    /// Generated once per host even when many tasks ask at once: concurrent
    /// callers await the same generation (about 0.1 ms of CPU, done inline;
    /// no particular runtime is required). A cached leaf that expires within
    /// validity/10 is regenerated. Bounded LRU by `capacity`; after a failed
    /// generation the next call for that host tries again.
    ///
    /// Leaf: SAN = DNS name or IP address, CN = host (omitted if longer than 64
    /// bytes), O = "edgepool", EKU serverAuth, keyUsage digitalSignature,
    /// no basicConstraints extension (an end-entity certificate: RFC 5280 lets it
    /// be omitted, and an explicit `cA FALSE` is the DEFAULT value, which DER
    /// forbids encoding — strict parsers such as Python `cryptography` reject it),
    /// random serial, ECDSA P-256, signed by the CA; chain sent = [leaf, CA].
    pub async fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let name = LeafName::parse(host)?;
        let slot = {
            let mut entries = self.entries.lock();
            let now = OffsetDateTime::now_utc();
            let m = &self.metrics;
            match entries.get(&name.key) {
                // A slot still being generated counts as fresh: wait for it.
                Some(slot) if slot.get().is_none_or(|leaf| now < leaf.refresh_at) => {
                    m.hit.inc();
                    Arc::clone(slot)
                }
                found => {
                    if found.is_some() { &m.expired } else { &m.miss }.inc();
                    let slot = Arc::new(Slot::new());
                    if let Some((old, _)) = entries.push(name.key.clone(), Arc::clone(&slot)) {
                        if old != name.key {
                            m.evictions.inc();
                        }
                    }
                    m.hosts.set(entries.len() as i64);
                    slot
                }
            }
        };
        // Generation is done inline: ~0.1 ms of CPU in release builds, the
        // same order as the server side of the TLS handshake that follows
        // (which tokio-rustls also runs inline); a blocking-pool hop measured
        // at ~0.2 ms extra latency per miss. Being synchronous, it cannot be
        // abandoned half-way by a cancelled caller.
        let leaf = slot
            .get_or_try_init(|| async { self.factory.generate(&name) })
            .await?;
        Ok(Arc::clone(&leaf.config))
    }

    /// How many leaves have been generated since start (for metrics and tests).
    pub fn generated(&self) -> u64 {
        self.factory.generated.load(Ordering::Relaxed)
    }

    /// How many hosts are cached now.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether no host is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.lock().is_empty()
    }
}

impl LeafFactory {
    /// Mints a key and certificate for `name` and wraps them in a server config.
    fn generate(&self, name: &LeafName) -> Result<Leaf, CaError> {
        let gen_err = |what, source| CaError::Generate { what, source };
        let tls_err = |what, source| CaError::ServerConfig { what, source };
        let now = now_utc_secs();
        let validity = time::Duration::try_from(self.validity).unwrap_or(time::Duration::MAX);
        let wanted_not_after = now.checked_add(validity).unwrap_or(self.ca.not_after);
        let clamped = wanted_not_after >= self.ca.not_after;
        let not_after = wanted_not_after.min(self.ca.not_after);

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if name.cn.len() <= MAX_CN_LEN {
            dn.push(DnType::CommonName, name.cn.as_str());
        }
        dn.push(DnType::OrganizationName, "edgepool");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![name.san.clone()];
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = not_after;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| gen_err("leaf key", e))?;
        let cert = params
            .signed_by(&key, &self.ca.issuer, &self.ca.key)
            .map_err(|e| gen_err("leaf certificate", e))?;

        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS versions", e))?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), self.ca.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| tls_err("TLS server config", e))?;
        config.alpn_protocols = self.alpn.clone();
        config.session_storage = Arc::clone(&self.session_storage);
        if let Some(ticketer) = &self.ticketer {
            config.ticketer = Arc::clone(ticketer);
        }

        // When the CA itself expires soon, regenerating cannot help: keep the
        // leaf until it actually expires instead of regenerating on every call.
        let margin = time::Duration::try_from(self.validity / 10).unwrap_or(time::Duration::MAX);
        let refresh_at = if clamped {
            not_after
        } else {
            not_after.checked_sub(margin).unwrap_or(now)
        };
        self.generated.fetch_add(1, Ordering::Relaxed);
        Ok(Leaf {
            config: Arc::new(config),
            refresh_at,
        })
    }
}

/// A validated, normalised leaf host.
struct LeafName {
    /// Cache key: lowercase DNS name without trailing dot, or canonical IP text.
    key: String,
    san: SanType,
    cn: String,
}

impl LeafName {
    fn parse(host: &str) -> Result<Self, CaError> {
        let invalid = |reason: &'static str| CaError::InvalidHost {
            host: host.to_owned(),
            reason,
        };
        if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| invalid("unbalanced '['"))?;
            let ip: std::net::Ipv6Addr = inner
                .parse()
                .map_err(|_| invalid("bracketed host is not an IPv6 address"))?;
            return Ok(Self::ip(IpAddr::V6(ip)));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Self::ip(ip));
        }
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        DnsName::try_from(name.as_str()).map_err(|_| {
            invalid("not a valid DNS name or IP address (no port, no wildcard, A-labels only)")
        })?;
        let ia5 = Ia5String::try_from(name.as_str()).map_err(|_| invalid("not ASCII"))?;
        Ok(Self {
            cn: name.clone(),
            san: SanType::DnsName(ia5),
            key: name,
        })
    }

    fn ip(ip: IpAddr) -> Self {
        let text = ip.to_string();
        Self {
            key: text.clone(),
            san: SanType::IpAddress(ip),
            cn: text,
        }
    }
}

/// `Ok(false)` if nothing exists at `path` (a dangling symlink counts as existing).
fn path_exists(path: &Path) -> Result<bool, CaError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CaError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn missing_cert(cert_path: &Path, key_path: &Path) -> CaError {
    CaError::Io {
        source: io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "CA certificate is missing although {} exists; restore the certificate, \
                 or delete {} to create a new CA (workers must then trust the new one)",
                key_path.display(),
                key_path.display()
            ),
        ),
        path: cert_path.to_owned(),
    }
}

/// Whether `path` was modified within the last 10 s (a CA being written by another instance).
fn recently_written(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(10))
}

/// Writes `contents` to a temporary file created with `mode` (never wider),
/// syncs it and links it to `path`: fails with `AlreadyExists` (and leaves the existing file
/// alone) when `path` exists.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    // Leftover of an earlier crashed run that had the same pid.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; make it exact.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn random_fill(buf: &mut [u8]) -> Result<(), CaError> {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| CaError::Random)
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    random_fill(&mut bytes)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01 << 6; // keep the full length (no leading zero byte to strip)
    Ok(SerialNumber::from_slice(&bytes))
}

/// Current time truncated to whole seconds, as X.509 encodes it.
fn now_utc_secs() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pem_encode_cert(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Parses an X.509 `Name` (raw DER) into an rcgen `DistinguishedName`.
/// Only single-valued RDNs with distinct attribute types are supported (what
/// rcgen can represent); the caller checks the re-encoding is identical.
fn parse_name(name_der: &[u8]) -> Result<DistinguishedName, DerError> {
    let mut input = name_der;
    let name = der::expect(&mut input, der::SEQUENCE, "name")?;
    let mut rdns = name.value;
    let mut dn = DistinguishedName::new();
    while !rdns.is_empty() {
        let set = der::expect(&mut rdns, der::SET, "RDN")?;
        let mut set_items = set.value;
        let atv = der::expect(&mut set_items, der::SEQUENCE, "attribute")?;
        if !set_items.is_empty() {
            return Err(DerError::MultiValuedRdn);
        }
        let mut atv_items = atv.value;
        let oid = der::expect(&mut atv_items, der::OID, "attribute type")?;
        let value = der::next(&mut atv_items)?;
        let ty = DnType::from_oid(&der::oid_arcs(oid.value)?);
        let text = || std::str::from_utf8(value.value).map_err(|_| DerError::AttributeNotUtf8);
        let bad = DerError::AttributeValue;
        let dn_value = match value.tag {
            0x0c => DnValue::Utf8String(text()?.to_owned()),
            0x13 => DnValue::PrintableString(PrintableString::try_from(text()?).map_err(bad)?),
            0x16 => DnValue::Ia5String(Ia5String::try_from(text()?).map_err(bad)?),
            0x14 => DnValue::TeletexString(TeletexString::try_from(text()?).map_err(bad)?),
            0x1c => DnValue::UniversalString(
                UniversalString::from_utf32be(value.value.to_vec()).map_err(bad)?,
            ),
            0x1e => DnValue::BmpString(BmpString::from_utf16be(value.value.to_vec()).map_err(bad)?),
            tag => return Err(DerError::AttributeType(tag)),
        };
        if dn.get(&ty).is_some() {
            return Err(DerError::RepeatedAttribute);
        }
        dn.push(ty, dn_value);
    }
    Ok(dn)
}

/// The parts of an X.509 certificate this module needs, borrowed from its DER.
struct ParsedCert<'a> {
    /// Raw DER of the issuer `Name` (tag and length included).
    #[cfg_attr(not(test), allow(dead_code))]
    issuer: &'a [u8],
    /// Raw DER of the subject `Name`.
    subject: &'a [u8],
    /// Raw DER of the `SubjectPublicKeyInfo`.
    spki: &'a [u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    extensions: Vec<Extension<'a>>,
}

struct Extension<'a> {
    /// OID content octets (e.g. `55 1d 13` for basicConstraints).
    oid: &'a [u8],
    #[cfg_attr(not(test), allow(dead_code))]
    critical: bool,
    /// Content of the `extnValue` OCTET STRING (the DER of the extension value).
    value: &'a [u8],
}

const OID_SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];

impl<'a> ParsedCert<'a> {
    fn parse(cert_der: &'a [u8]) -> Result<Self, DerError> {
        let mut input = cert_der;
        let cert = der::expect(&mut input, der::SEQUENCE, "certificate")?;
        if !input.is_empty() {
            return Err(DerError::TrailingData);
        }
        let mut cert_items = cert.value;
        let tbs = der::expect(&mut cert_items, der::SEQUENCE, "tbsCertificate")?;
        let mut t = tbs.value;
        let mut serial = der::next(&mut t)?;
        if serial.tag == 0xa0 {
            serial = der::next(&mut t)?; // skip [0] version
        }
        if serial.tag != der::INTEGER {
            return Err(DerError::Serial);
        }
        der::expect(&mut t, der::SEQUENCE, "signature algorithm")?;
        let issuer = der::expect(&mut t, der::SEQUENCE, "issuer")?;
        let validity = der::expect(&mut t, der::SEQUENCE, "validity")?;
        let subject = der::expect(&mut t, der::SEQUENCE, "subject")?;
        let spki = der::expect(&mut t, der::SEQUENCE, "subjectPublicKeyInfo")?;
        let mut extensions = Vec::new();
        while !t.is_empty() {
            let item = der::next(&mut t)?;
            if item.tag != 0xa3 {
                continue; // issuerUniqueID / subjectUniqueID
            }
            let mut wrapper = item.value;
            let list = der::expect(&mut wrapper, der::SEQUENCE, "extensions")?;
            let mut exts = list.value;
            while !exts.is_empty() {
                let ext = der::expect(&mut exts, der::SEQUENCE, "extension")?;
                let mut e = ext.value;
                let oid = der::expect(&mut e, der::OID, "extension id")?;
                let mut field = der::next(&mut e)?;
                let mut critical = false;
                if field.tag == der::BOOLEAN {
                    critical = field.value == [0xff];
                    field = der::next(&mut e)?;
                }
                if field.tag != der::OCTET_STRING {
                    return Err(DerError::ExtensionValue);
                }
                extensions.push(Extension {
                    oid: oid.value,
                    critical,
                    value: field.value,
                });
            }
        }
        let mut times = validity.value;
        let not_before = der::time(der::next(&mut times)?)?;
        let not_after = der::time(der::next(&mut times)?)?;
        Ok(Self {
            issuer: issuer.raw,
            subject: subject.raw,
            spki: spki.raw,
            not_before,
            not_after,
            extensions,
        })
    }

    fn extension(&self, oid: &[u8]) -> Option<&Extension<'a>> {
        self.extensions.iter().find(|e| e.oid == oid)
    }

    /// `(cA, pathLenConstraint)` from basicConstraints, if present.
    fn basic_constraints(&self) -> Result<Option<(bool, Option<u64>)>, DerError> {
        let Some(ext) = self.extension(OID_BASIC_CONSTRAINTS) else {
            return Ok(None);
        };
        let mut input = ext.value;
        let seq = der::expect(&mut input, der::SEQUENCE, "basicConstraints")?;
        let mut items = seq.value;
        let mut ca = false;
        let mut path_len = None;
        while !items.is_empty() {
            let item = der::next(&mut items)?;
            match item.tag {
                der::BOOLEAN => ca = item.value == [0xff],
                der::INTEGER if item.value.len() <= 8 => {
                    path_len = Some(
                        item.value
                            .iter()
                            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
                    )
                }
                _ => return Err(DerError::BasicConstraints),
            }
        }
        Ok(Some((ca, path_len)))
    }

    /// The subjectKeyIdentifier octets, if present.
    fn subject_key_id(&self) -> Result<Option<&'a [u8]>, DerError> {
        let Some(ext) = self.extension(OID_SUBJECT_KEY_ID) else {
            return Ok(None);
        };
        let mut input = ext.value;
        Ok(Some(
            der::expect(&mut input, der::OCTET_STRING, "subjectKeyIdentifier")?.value,
        ))
    }
}

/// A minimal DER reader: just enough of X.509 for this module (and its tests).
mod der {
    use time::{Date, Month, OffsetDateTime, Time};

    use super::DerError;

    pub(super) const BOOLEAN: u8 = 0x01;
    pub(super) const INTEGER: u8 = 0x02;
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) const BIT_STRING: u8 = 0x03;
    pub(super) const OCTET_STRING: u8 = 0x04;
    pub(super) const OID: u8 = 0x06;
    pub(super) const SEQUENCE: u8 = 0x30;
    pub(super) const SET: u8 = 0x31;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;

    /// One DER element.
    #[derive(Clone, Copy)]
    pub(super) struct Tlv<'a> {
        pub(super) tag: u8,
        /// Content octets.
        pub(super) value: &'a [u8],
        /// The whole element, tag and length included.
        pub(super) raw: &'a [u8],
    }

    /// Reads one element from the front of `input` and advances it.
    pub(super) fn next<'a>(input: &mut &'a [u8]) -> Result<Tlv<'a>, DerError> {
        let data: &'a [u8] = input;
        let (&tag, rest) = data
            .split_first()
            .ok_or(DerError::Truncated { part: "tag" })?;
        if tag & 0x1f == 0x1f {
            return Err(DerError::MultiByteTag);
        }
        let (&first, rest) = rest
            .split_first()
            .ok_or(DerError::Truncated { part: "length" })?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(DerError::Length);
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err(DerError::Truncated { part: "value" });
        }
        let header = data.len() - rest.len();
        *input = &rest[len..];
        Ok(Tlv {
            tag,
            value: &rest[..len],
            raw: &data[..header + len],
        })
    }

    /// Like [`next`], requiring `tag`; `what` names the field in errors.
    pub(super) fn expect<'a>(
        input: &mut &'a [u8],
        tag: u8,
        what: &'static str,
    ) -> Result<Tlv<'a>, DerError> {
        let tlv = next(input).map_err(|e| DerError::Field {
            what,
            source: Box::new(e),
        })?;
        if tlv.tag != tag {
            return Err(DerError::Tag {
                what,
                expected: tag,
                found: tlv.tag,
            });
        }
        Ok(tlv)
    }

    /// Decodes OID content octets into arcs.
    pub(super) fn oid_arcs(content: &[u8]) -> Result<Vec<u64>, DerError> {
        if content.is_empty() || content[content.len() - 1] & 0x80 != 0 {
            return Err(DerError::Oid);
        }
        let mut arcs = Vec::new();
        let mut acc: u64 = 0;
        for &b in content {
            if acc > u64::MAX >> 7 {
                return Err(DerError::OidArc);
            }
            acc = (acc << 7) | u64::from(b & 0x7f);
            if b & 0x80 == 0 {
                if arcs.is_empty() {
                    let first = (acc / 40).min(2);
                    arcs.push(first);
                    arcs.push(acc - first * 40);
                } else {
                    arcs.push(acc);
                }
                acc = 0;
            }
        }
        Ok(arcs)
    }

    /// Decodes a UTCTime or GeneralizedTime of the form X.509 mandates (`...Z`).
    pub(super) fn time(tlv: Tlv<'_>) -> Result<OffsetDateTime, DerError> {
        let text = std::str::from_utf8(tlv.value).map_err(|_| DerError::TimeNotAscii)?;
        let digits = text.strip_suffix('Z').ok_or(DerError::TimeNotUtc)?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DerError::TimeMalformed(text.to_owned()));
        }
        let num = |s: &str| {
            s.parse::<u16>()
                .map_err(|_| DerError::TimeMalformed(text.to_owned()))
        };
        let (year, rest) = match (tlv.tag, digits.len()) {
            (UTC_TIME, 12) => {
                let yy = num(&digits[..2])?;
                (if yy < 50 { 2000 + yy } else { 1900 + yy }, &digits[2..])
            }
            (GENERALIZED_TIME, 14) => (num(&digits[..4])?, &digits[4..]),
            _ => return Err(DerError::TimeEncoding(text.to_owned())),
        };
        let field = |i: usize| -> Result<u8, DerError> {
            num(&rest[i..i + 2]).map(|v| v as u8) // two digits always fit
        };
        let bad = |source| DerError::TimeInvalid {
            text: text.to_owned(),
            source,
        };
        let month = Month::try_from(field(0)?).map_err(bad)?;
        let date = Date::from_calendar_date(i32::from(year), month, field(2)?).map_err(bad)?;
        let time = Time::from_hms(field(4)?, field(6)?, field(8)?).map_err(bad)?;
        Ok(date.with_time(time).assume_utc())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::ServerName;
    use rustls::{CertificateError, ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

    fn new_ca() -> (tempfile::TempDir, Arc<CertAuthority>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(&dir.path().join("data")).unwrap();
        (dir, Arc::new(ca))
    }

    fn alpn() -> Vec<Vec<u8>> {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn common_name(cert_der: &[u8]) -> String {
        let parsed = ParsedCert::parse(cert_der).unwrap();
        let dn = parse_name(parsed.subject).unwrap();
        match dn.get(&DnType::CommonName) {
            Some(DnValue::Utf8String(s)) => s.clone(),
            other => panic!("unexpected CN {other:?}"),
        }
    }

    /// Client and server handshake over an in-memory pipe; returns the
    /// client's result (negotiated ALPN and peer chain) or its error.
    async fn handshake(
        server: Arc<ServerConfig>,
        trusted: &CertificateDer<'static>,
        name: &str,
        offer_alpn: Vec<Vec<u8>>,
    ) -> Result<(Option<Vec<u8>>, Vec<CertificateDer<'static>>), io::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let mut client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.alpn_protocols = offer_alpn;
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await?;
            Ok::<_, io::Error>(())
        };
        let client_side = async move {
            let mut tls = TlsConnector::from(Arc::new(client))
                .connect(server_name, client_io)
                .await?;
            tls.write_all(b"ping").await?;
            tls.flush().await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            let conn = tls.get_ref().1;
            Ok::<_, io::Error>((
                conn.alpn_protocol().map(<[u8]>::to_vec),
                conn.peer_certificates().unwrap_or_default().to_vec(),
            ))
        };
        let (client_result, _server_result) = tokio::join!(client_side, server_side);
        client_result
    }

    fn rustls_error(err: &io::Error) -> &rustls::Error {
        err.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .unwrap_or_else(|| panic!("not a rustls error: {err:?}"))
    }

    #[test]
    fn create_writes_files_with_safe_modes_and_reload_is_identical() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        let created = CertAuthority::load_or_create(&data).unwrap();
        assert_eq!(mode_of(&data), 0o700);
        let key_path = CertAuthority::key_path(&data);
        let cert_path = CertAuthority::cert_path(&data);
        assert_eq!(key_path, data.join("ca-key.pem"));
        assert_eq!(cert_path, data.join("ca.pem"));
        assert_eq!(mode_of(&key_path), 0o600);
        assert_eq!(fs::read_to_string(&cert_path).unwrap(), created.cert_pem());
        assert!(created
            .cert_pem()
            .starts_with("-----BEGIN CERTIFICATE-----\n"));
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&data).unwrap().count(), 2);

        let loaded = CertAuthority::load_or_create(&data).unwrap();
        assert_eq!(loaded.cert_der(), created.cert_der());
        assert_eq!(loaded.cert_pem(), created.cert_pem());
    }

    #[test]
    fn group_or_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CertAuthority::load_or_create(dir.path()).unwrap();
        let key_path = CertAuthority::key_path(dir.path());
        fs::set_permissions(&key_path, Permissions::from_mode(0o644)).unwrap();
        match CertAuthority::load_or_create(dir.path()) {
            Err(CaError::InsecureKeyPermissions { path, mode }) => {
                assert_eq!(path, key_path);
                assert_eq!(mode, 0o644);
            }
            other => panic!("expected InsecureKeyPermissions, got {other:?}"),
        }
        fs::set_permissions(&key_path, Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            CertAuthority::load_or_create(dir.path()),
            Err(CaError::InsecureKeyPermissions { mode: 0o640, .. })
        ));
        fs::set_permissions(&key_path, Permissions::from_mode(0o400)).unwrap();
        CertAuthority::load_or_create(dir.path()).unwrap();
    }

    #[test]
    fn a_broken_certificate_file_is_named_with_a_typed_reason() {
        let (dir, _ca) = new_ca();
        let data = dir.path().join("data");
        let cert_path = CertAuthority::cert_path(&data);
        let parse_error = |pem: &str| {
            fs::write(&cert_path, pem).unwrap();
            match CertAuthority::load_or_create(&data) {
                Err(CaError::Parse { path, reason }) => {
                    assert_eq!(path, cert_path);
                    reason
                }
                other => panic!("expected Parse error, got {other:?}"),
            }
        };
        let none = parse_error("");
        assert!(matches!(none, CaFileError::CertificateCount(0)), "{none:?}");
        // Valid PEM around DER that is a SEQUENCE cut short.
        let cut = parse_error("-----BEGIN CERTIFICATE-----\nMAU=\n-----END CERTIFICATE-----\n");
        assert!(
            matches!(
                &cut,
                CaFileError::Certificate(DerError::Field { what: "certificate", source })
                    if **source == DerError::Truncated { part: "value" }
            ),
            "{cut:?}"
        );
        let text = CaError::Parse {
            path: cert_path.clone(),
            reason: cut,
        }
        .to_string();
        assert_eq!(
            text,
            format!(
                "{}: invalid certificate: certificate: truncated DER (value)",
                cert_path.display()
            )
        );
    }

    #[test]
    fn der_time_errors_say_what_is_wrong() {
        let utc = |text: &'static str| der::Tlv {
            tag: 0x17,
            value: text.as_bytes(),
            raw: text.as_bytes(),
        };
        assert_eq!(der::time(utc("261204060000")), Err(DerError::TimeNotUtc));
        assert_eq!(
            der::time(utc("2612040600Z")),
            Err(DerError::TimeEncoding("2612040600Z".into()))
        );
        let bad_month = der::time(utc("261304060000Z")).unwrap_err();
        assert!(
            matches!(&bad_month, DerError::TimeInvalid { text, .. } if text == "261304060000Z"),
            "{bad_month:?}"
        );
        assert_eq!(bad_month.to_string(), "invalid time \"261304060000Z\"");
        assert_eq!(
            der::time(utc("261204060000Z")).unwrap().year(),
            2026,
            "a valid UTCTime still decodes"
        );
    }

    #[test]
    fn half_present_or_mismatched_files_are_refused_not_overwritten() {
        let (dir_a, ca_a) = new_ca();
        let (dir_b, _ca_b) = new_ca();
        let data_a = dir_a.path().join("data");
        let data_b = dir_b.path().join("data");

        // Key from another install: certificate does not match.
        fs::copy(
            CertAuthority::key_path(&data_b),
            CertAuthority::key_path(&data_a),
        )
        .unwrap();
        match CertAuthority::load_or_create(&data_a) {
            Err(CaError::Parse { path, reason }) => {
                assert_eq!(path, CertAuthority::cert_path(&data_a));
                assert!(
                    matches!(&reason, CaFileError::KeyMismatch { key } if *key == CertAuthority::key_path(&data_a)),
                    "{reason:?}"
                );
                assert!(reason.to_string().contains("does not match"), "{reason}");
            }
            other => panic!("expected Parse error, got {other:?}"),
        }

        // Key missing: error, and ca.pem is left untouched.
        fs::remove_file(CertAuthority::key_path(&data_a)).unwrap();
        match CertAuthority::load_or_create(&data_a) {
            Err(CaError::Io { path, source }) => {
                assert_eq!(path, CertAuthority::key_path(&data_a));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected Io error, got {other:?}"),
        }
        assert_eq!(
            fs::read_to_string(CertAuthority::cert_path(&data_a)).unwrap(),
            ca_a.cert_pem()
        );
    }

    #[test]
    fn two_installs_have_different_subjects() {
        let (_d1, ca1) = new_ca();
        let (_d2, ca2) = new_ca();
        let cn1 = common_name(ca1.cert_der());
        let cn2 = common_name(ca2.cert_der());
        assert_ne!(cn1, cn2);
        for cn in [&cn1, &cn2] {
            let suffix = cn.strip_prefix("edgepool interception CA ").unwrap();
            assert_eq!(suffix.len(), 8, "{cn}");
            assert!(suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{cn}");
        }
        let p1 = ParsedCert::parse(ca1.cert_der()).unwrap();
        let p2 = ParsedCert::parse(ca2.cert_der()).unwrap();
        assert_ne!(p1.subject, p2.subject);
        let dn = parse_name(p1.subject).unwrap();
        assert_eq!(
            dn.get(&DnType::OrganizationName),
            Some(&DnValue::Utf8String("edgepool".into()))
        );
    }

    #[test]
    fn ca_certificate_constraints_and_validity() {
        let (_dir, ca) = new_ca();
        let parsed = ParsedCert::parse(ca.cert_der()).unwrap();
        // basicConstraints: critical, CA:TRUE, pathlen 0.
        let bc = parsed.extension(OID_BASIC_CONSTRAINTS).unwrap();
        assert!(bc.critical);
        assert_eq!(parsed.basic_constraints().unwrap(), Some((true, Some(0))));
        // keyUsage: critical, exactly keyCertSign (bit 5) and cRLSign (bit 6).
        let ku = parsed.extension(&[0x55, 0x1d, 0x0f]).unwrap();
        assert!(ku.critical);
        let mut input = ku.value;
        let bits = der::expect(&mut input, der::BIT_STRING, "keyUsage").unwrap();
        let flags: Vec<u8> = bits.value[1..].to_vec();
        assert_eq!(flags[0], 0x06, "{flags:?}");
        assert!(flags[1..].iter().all(|&b| b == 0), "{flags:?}");
        // ECDSA P-256 key: id-ecPublicKey + prime256v1 inside the SPKI.
        let p256_oid: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        assert!(parsed.spki.windows(p256_oid.len()).any(|w| w == p256_oid));
        // Self-issued, backdated one day, valid for ten years.
        assert_eq!(parsed.issuer, parsed.subject);
        let now = OffsetDateTime::now_utc();
        let backdate = now - parsed.not_before;
        assert!(backdate >= time::Duration::hours(23) && backdate <= time::Duration::hours(25));
        let lifetime = parsed.not_after - parsed.not_before;
        assert_eq!(lifetime, CA_VALIDITY + CA_BACKDATE);
        assert!(parsed.subject_key_id().unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_generate_one_leaf() {
        let (_dir, ca) = new_ca();
        let cache = Arc::new(LeafCache::new(ca, 100, WEEK, alpn()));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.server_config("example.com").await.unwrap() })
            })
            .collect();
        let mut configs = Vec::new();
        for task in tasks {
            configs.push(task.await.unwrap());
        }
        assert_eq!(cache.generated(), 1);
        assert_eq!(cache.len(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
        // Same host spelled differently hits the same entry.
        let again = cache.server_config("EXAMPLE.com.").await.unwrap();
        assert!(Arc::ptr_eq(&again, &configs[0]));
        assert_eq!(cache.generated(), 1);
    }

    #[tokio::test]
    async fn lru_is_bounded_by_capacity() {
        let (_dir, ca) = new_ca();
        let cache = LeafCache::new(ca, 2, WEEK, alpn());
        assert!(cache.is_empty());
        for host in ["a.example", "b.example", "c.example"] {
            cache.server_config(host).await.unwrap();
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.generated(), 3);
        cache.server_config("c.example").await.unwrap(); // still cached
        assert_eq!(cache.generated(), 3);
        cache.server_config("a.example").await.unwrap(); // was evicted
        assert_eq!(cache.generated(), 4);
        assert_eq!(cache.len(), 2);
        // Lookups: a b c miss, c hit, a miss; a was evicted by c, b by a again.
        let m = metrics_text(&cache);
        for line in [
            "edgepool_leaf_cache_lookups_total{result=\"hit\"} 1\n",
            "edgepool_leaf_cache_lookups_total{result=\"miss\"} 4\n",
            "edgepool_leaf_cache_lookups_total{result=\"expired\"} 0\n",
            "edgepool_leaf_cache_evictions_total 2\n",
            "edgepool_leaf_cache_hosts 2\n",
        ] {
            assert!(m.contains(line), "{line:?} in:\n{m}");
        }
    }

    #[tokio::test]
    async fn leaf_close_to_expiry_is_regenerated() {
        let (_dir, ca) = new_ca();
        let cache = LeafCache::new(ca, 10, Duration::from_secs(1), alpn());
        let first = cache.server_config("shop.example").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = cache.server_config("shop.example").await.unwrap();
        assert_eq!(cache.generated(), 2);
        assert!(!Arc::ptr_eq(&first, &second));
        let m = metrics_text(&cache);
        assert!(
            m.contains("edgepool_leaf_cache_lookups_total{result=\"expired\"} 1\n"),
            "{m}"
        );
        assert!(m.contains("edgepool_leaf_cache_evictions_total 0\n"), "{m}");
    }

    /// The cache's metrics in the Prometheus text format.
    fn metrics_text(cache: &LeafCache) -> String {
        let mut registry = Registry::default();
        cache.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[tokio::test]
    async fn invalid_hosts_are_rejected_and_not_cached() {
        let (_dir, ca) = new_ca();
        let cache = LeafCache::new(ca, 10, WEEK, alpn());
        for host in [
            "",
            "exa mple.com",
            "example.com:443",
            "*.example.com",
            "[example.com]",
            "[::1",
        ] {
            assert!(
                matches!(
                    cache.server_config(host).await,
                    Err(CaError::InvalidHost { .. })
                ),
                "{host:?}"
            );
        }
        assert!(cache.is_empty());
        assert_eq!(cache.generated(), 0);
    }

    #[tokio::test]
    async fn tls_handshake_verifies_against_our_ca_only() {
        let (_dir, ca) = new_ca();
        let cache = LeafCache::new(Arc::clone(&ca), 10, WEEK, alpn());
        let config = cache.server_config("shop.example").await.unwrap();

        // ALPN h2 negotiated; chain is [leaf, CA].
        let (alpn, chain) = handshake(
            Arc::clone(&config),
            ca.cert_der(),
            "shop.example",
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )
        .await
        .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], ca.cert_der());

        // Leaf contents.
        let leaf = ParsedCert::parse(&chain[0]).unwrap();
        let ca_parsed = ParsedCert::parse(ca.cert_der()).unwrap();
        assert_eq!(leaf.issuer, ca_parsed.subject);
        // An end-entity certificate: no basicConstraints at all (an explicit DEFAULT
        // cA=FALSE is not DER, and strict parsers refuse it).
        assert_eq!(leaf.basic_constraints().unwrap(), None);
        let eku = leaf.extension(&[0x55, 0x1d, 0x25]).unwrap();
        let server_auth: &[u8] = &[0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
        assert_eq!(&eku.value[2..], server_auth);
        assert_eq!(common_name(&chain[0]), "shop.example");
        assert_eq!(
            leaf.not_after - leaf.not_before,
            time::Duration::try_from(WEEK).unwrap() + LEAF_BACKDATE
        );

        // Only http/1.1 offered: that is what is negotiated.
        let (alpn, _) = handshake(
            Arc::clone(&config),
            ca.cert_der(),
            "shop.example",
            vec![b"http/1.1".to_vec()],
        )
        .await
        .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));

        // Wrong name: verification fails.
        let err = handshake(
            Arc::clone(&config),
            ca.cert_der(),
            "other.example",
            alpn_none(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err:?}"
        );

        // A client trusting a different CA rejects the chain.
        let (_dir2, other_ca) = new_ca();
        let err = handshake(config, other_ca.cert_der(), "shop.example", alpn_none())
            .await
            .unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
    }

    fn alpn_none() -> Vec<Vec<u8>> {
        Vec::new()
    }

    #[tokio::test]
    async fn tls_handshake_for_ip_literals() {
        let (_dir, ca) = new_ca();
        let cache = LeafCache::new(Arc::clone(&ca), 10, WEEK, alpn());
        let v4 = cache.server_config("127.0.0.1").await.unwrap();
        handshake(v4, ca.cert_der(), "127.0.0.1", alpn_none())
            .await
            .unwrap();

        let v6 = cache.server_config("[::1]").await.unwrap();
        let same = cache.server_config("::1").await.unwrap();
        assert!(Arc::ptr_eq(&v6, &same));
        assert_eq!(cache.generated(), 2);
        handshake(v6, ca.cert_der(), "::1", alpn_none())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn leaves_from_reloaded_ca_chain_to_the_original_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let original = CertAuthority::load_or_create(dir.path()).unwrap();
        let reloaded = Arc::new(CertAuthority::load_or_create(dir.path()).unwrap());
        let cache = LeafCache::new(Arc::clone(&reloaded), 10, WEEK, alpn());
        let config = cache.server_config("shop.example").await.unwrap();
        let (_, chain) = handshake(config, original.cert_der(), "shop.example", alpn_none())
            .await
            .unwrap();
        assert_eq!(&chain[1], original.cert_der());
    }
}
