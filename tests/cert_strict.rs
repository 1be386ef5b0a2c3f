//! Every certificate edgepool issues passes strict parsers: the CA and the interception leaves
//! (DNS name, IP literal v4/v6, a name too long for a CN), for a CA edgepool generated and for
//! CAs a user brings with other key types (ECDSA P-384, RSA 2048, Ed25519).
//!
//! The leaves are taken from the real path — CONNECT through the running gateway, TLS
//! handshake — and checked by Python `cryptography` (strict DER parse of every extension, plus
//! its RFC 5280 path verifier; what Scrapy runs) and by `openssl x509` / `openssl verify
//! -x509_strict`. Before leaves stopped carrying an explicit DEFAULT `cA=FALSE`, `cryptography`
//! refused every leaf (`ParseError … BasicConstraints::ca`) and Scrapy failed every request.
mod gw;
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use edgepool::ca::CertAuthority;
use gw::TestGateway;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};
use tokio::process::Command;

const SUBPROCESS_TIMEOUT: Duration = Duration::from_secs(90);

/// A long name (> 64 bytes, so the leaf has no CN, only the SAN).
const LONG_NAME: &str =
    "a-name-longer-than-sixty-four-bytes.in-several-labels.so-it-has-no-cn.test";

async fn output(cmd: &mut Command) -> std::process::Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let desc = format!("{:?}", cmd.as_std());
    match tokio::time::timeout(SUBPROCESS_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("could not run {desc}: {e}"),
        Err(_) => panic!("{desc} did not finish within {SUBPROCESS_TIMEOUT:?}"),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Python can import `cryptography` with the path verifier (42+): loud skip locally, a failure
/// under `CI=true`.
async fn cryptography_available() -> bool {
    if !support::require_tool("python3") {
        return false;
    }
    let out = output(Command::new("python3").args([
        "-c",
        "import cryptography.x509.verification, cryptography; print(cryptography.__version__)",
    ]))
    .await;
    if out.status.success() {
        eprintln!("python cryptography {}", text(&out.stdout).trim());
        return true;
    }
    let why = text(&out.stderr);
    support::skip(&format!(
        "python cryptography >= 42 not importable ({}); install it with \
         `python3 -m pip install cryptography`",
        why.trim().lines().last().unwrap_or("")
    ))
}

/// Writes a CA of the given key type into `dir` the way edgepool stores its own
/// (`ca.pem` 0644, `ca.key` 0600), for edgepool to load.
fn write_user_ca(dir: &Path, key: &KeyPair, label: &str) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
        .distinguished_name
        .push(DnType::CommonName, format!("strict-parser test CA {label}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "edgepool tests");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    let cert = params.self_signed(key).unwrap();
    let key_path = CertAuthority::key_path(dir);
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(CertAuthority::cert_path(dir), cert.pem()).unwrap();
}

fn generated_key(alg: &'static SignatureAlgorithm) -> KeyPair {
    KeyPair::generate_for(alg).unwrap()
}

/// RSA keys come from openssl (ring cannot generate them).
async fn openssl_rsa_key(bits: u32) -> KeyPair {
    let out = output(Command::new("openssl").args([
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        &format!("rsa_keygen_bits:{bits}"),
    ]))
    .await;
    assert!(
        out.status.success(),
        "openssl genpkey: {}",
        text(&out.stderr)
    );
    KeyPair::from_pem(&text(&out.stdout)).unwrap()
}

/// Starts a gateway on the CA in `data_dir` (created when empty), fetches the leaves and
/// checks CA and leaves with both parsers.
async fn check_ca(label: &str, data_dir: &Path) {
    let hosts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        hosts.path(),
        format!("127.0.0.1 localhost {LONG_NAME}\n::1 localhost\n"),
    )
    .unwrap();
    let dir = data_dir.to_path_buf();
    let hosts_path = hosts.path().to_path_buf();
    let gw = TestGateway::start_with(&[], move |cfg| {
        cfg.data_dir = Some(dir);
        cfg.upstream.hosts_file = hosts_path;
    })
    .await;
    let ca_path = CertAuthority::cert_path(data_dir);
    // Nothing has to listen there: the leaf is minted at CONNECT, before any upstream dial.
    let port = support::free_port();
    let targets = serde_json::json!([
        { "connect": format!("localhost:{port}"), "name": "localhost", "kind": "dns" },
        { "connect": format!("{LONG_NAME}:{port}"), "name": LONG_NAME, "kind": "dns" },
        { "connect": format!("127.0.0.1:{port}"), "name": "127.0.0.1", "kind": "ip" },
        { "connect": format!("[::1]:{port}"), "name": "::1", "kind": "ip" },
    ]);
    let out_dir = tempfile::tempdir().unwrap();
    let spec_path = out_dir.path().join("spec.json");
    let spec = serde_json::json!({
        "proxy": gw.proxy.to_string(),
        "ca": ca_path,
        "out": out_dir.path(),
        "targets": targets,
    });
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/strict_certs.py");
    let out = output(Command::new("python3").arg(script).arg(&spec_path)).await;
    assert!(
        out.status.success(),
        "{label}: strict_certs.py failed\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    eprintln!("{label}: {report}");

    // The CA: decoded in full, a CA with both key-usage and basic constraints.
    let ca_exts = report["ca"]["extensions"].to_string();
    assert!(
        ca_exts.contains("basicConstraints") && ca_exts.contains("keyUsage"),
        "{label}: CA extensions {ca_exts}"
    );
    let leaves = report["leaves"].as_array().unwrap();
    assert_eq!(leaves.len(), 4, "{label}: {report}");
    for leaf in leaves {
        let what = format!("{label} leaf for {}", leaf["target"]);
        assert_eq!(
            leaf["parsed"], true,
            "{what}: cryptography could not parse it: {leaf}"
        );
        assert_eq!(
            leaf["verified"], true,
            "{what}: cryptography's verifier refused it: {leaf}"
        );
        let exts = leaf["extensions"].to_string();
        assert!(
            exts.contains("subjectAltName")
                && exts.contains("extendedKeyUsage")
                && exts.contains("keyUsage"),
            "{what}: extensions {exts}"
        );
        assert!(
            !exts.contains("basicConstraints"),
            "{what}: an end-entity certificate carries no basicConstraints (an explicit \
             DEFAULT cA=FALSE is not DER): {exts}"
        );

        // openssl: full text decode, then strict chain verification for a TLS server.
        let der = leaf["der"].as_str().unwrap();
        let decoded = output(
            Command::new("openssl").args(["x509", "-inform", "DER", "-in", der, "-noout", "-text"]),
        )
        .await;
        assert!(
            decoded.status.success(),
            "{what}: openssl x509 refused it: {}",
            text(&decoded.stderr)
        );
        let pem_path = format!("{der}.pem");
        let conv = output(
            Command::new("openssl").args(["x509", "-inform", "DER", "-in", der, "-out", &pem_path]),
        )
        .await;
        assert!(conv.status.success(), "{what}: {}", text(&conv.stderr));
        let verify = output(
            Command::new("openssl")
                .args(["verify", "-x509_strict", "-purpose", "sslserver", "-CAfile"])
                .arg(&ca_path)
                .arg(&pem_path),
        )
        .await;
        assert!(
            verify.status.success() && text(&verify.stdout).trim().ends_with(": OK"),
            "{what}: openssl verify -x509_strict: {}{}",
            text(&verify.stdout),
            text(&verify.stderr)
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_issued_certificate_passes_strict_parsers() {
    if !support::require_tool("openssl") || !cryptography_available().await {
        return;
    }
    // The CA edgepool creates on first run (ECDSA P-256).
    let generated = tempfile::tempdir().unwrap();
    check_ca("generated P-256 CA", generated.path()).await;

    // CAs a user brings: other key types edgepool loads and signs leaves with.
    let p384 = tempfile::tempdir().unwrap();
    write_user_ca(
        p384.path(),
        &generated_key(&rcgen::PKCS_ECDSA_P384_SHA384),
        "P-384",
    );
    check_ca("user P-384 CA", p384.path()).await;

    let rsa = tempfile::tempdir().unwrap();
    write_user_ca(rsa.path(), &openssl_rsa_key(2048).await, "RSA-2048");
    check_ca("user RSA-2048 CA", rsa.path()).await;
}

/// Ed25519 CAs load and sign, and `openssl verify -x509_strict` accepts their leaves; the web
/// PKI verifiers (cryptography's, browsers') do not accept Ed25519 signatures at all, which the
/// README says — this test pins both halves so neither drifts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_ca_leaves_parse_but_web_pki_verifiers_refuse_the_signature() {
    if !support::require_tool("openssl") || !cryptography_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_user_ca(dir.path(), &generated_key(&rcgen::PKCS_ED25519), "Ed25519");
    let gw = TestGateway::start_with(&[], {
        let d = dir.path().to_path_buf();
        move |cfg| cfg.data_dir = Some(d)
    })
    .await;
    let out_dir = tempfile::tempdir().unwrap();
    let spec_path = out_dir.path().join("spec.json");
    let spec = serde_json::json!({
        "proxy": gw.proxy.to_string(),
        "ca": CertAuthority::cert_path(dir.path()),
        "out": out_dir.path(),
        "targets": [{ "connect": format!("127.0.0.1:{}", support::free_port()),
                      "name": "127.0.0.1", "kind": "ip" }],
    });
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/strict_certs.py");
    let out = output(Command::new("python3").arg(script).arg(&spec_path)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let leaf = &report["leaves"][0];
    assert_eq!(leaf["parsed"], true, "{leaf}");
    assert_eq!(leaf["verified"], false, "{leaf}");
    eprintln!("Ed25519 leaf: {leaf}");
    let why = leaf["error"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        why.contains("signature") || why.contains("algorithm") || why.contains("key"),
        "the refusal should be about the Ed25519 signature/key, not something else: {leaf}"
    );
    gw.stop().await;
}
