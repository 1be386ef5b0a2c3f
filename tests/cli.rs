//! The `edgepool` binary: `check`, `ca path`, `ca export`, `serve` flags.
use std::process::Command;

fn edgepool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgepool"))
}

#[test]
fn check_accepts_the_example_and_names_a_bad_key() {
    let ok = edgepool()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[pool]\nmax_idel_total = 3\n").unwrap();
    let out = edgepool()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_idel_total"), "{err}");

    std::fs::write(&bad, "[pool]\nmax_per_key = 0\n").unwrap();
    let out = edgepool()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool.max_per_key"));
}

#[test]
fn ca_path_creates_the_ca_once_and_export_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = edgepool()
        .args(["ca", "path", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(path, dir.path().join("ca.pem").display().to_string());
    let pem = std::fs::read_to_string(&path).unwrap();
    let out = edgepool()
        .args(["ca", "export", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        pem,
        "export prints the same CA"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn serve_reports_a_bad_flag_value_and_an_unusable_listen_address() {
    let out = edgepool()
        .args(["serve", "--allow-target", "not-a-cidr"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-target"));
    let dir = tempfile::tempdir().unwrap();
    let out = edgepool()
        .args([
            "serve",
            "--listen",
            "192.0.2.1:1",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.proxy"));
}

#[test]
fn ca_path_follows_the_config_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let cfg = dir.path().join("edgepool.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = {:?}\n", data.display().to_string()),
    )
    .unwrap();
    let out = edgepool()
        .args(["ca", "path", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        data.join("ca.pem").display().to_string()
    );
}
