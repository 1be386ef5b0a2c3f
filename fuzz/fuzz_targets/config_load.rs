//! Fuzzes `edgepool::config::Config::from_toml_str`. Invariants:
//! * nothing panics (TOML parsing, serde/humantime/ipnet deserialisation, validation);
//! * errors have a non-empty message; `Invalid` errors name a non-empty key;
//! * Ok(cfg) => `cfg.validate()` is Ok (from_toml_str validates) and re-validating is
//!   idempotent (still Ok the second time);
//! * Ok(cfg) => what validation promises downstream holds: every `auth.tokens` entry passes
//!   `validate_token`, every pool name passes `validate_name`, `exits.pool_specs()` is Ok
//!   ("call after validation"), and `pool.to_pool_config()` / `exits.settings()` don't panic.
//! Note: validation checks that `upstream.extra_ca_files` exist, so it touches the file
//! system; the fuzzer only reads (stat), never writes.
#![no_main]

use edgepool::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml_str(text) {
        Ok(cfg) => {
            cfg.validate().expect("from_toml_str Ok but validate() Err");
            cfg.validate().expect("validate() not idempotent");
            for t in &cfg.auth.tokens {
                assert!(edgepool::worker::validate_token(t).is_ok(), "invalid token accepted");
            }
            for p in &cfg.exits.pools {
                assert!(edgepool::worker::validate_name(&p.name).is_ok(), "bad pool name accepted");
            }
            let specs = cfg.exits.pool_specs().expect("validated config: pool_specs() Err");
            assert_eq!(specs.len(), cfg.exits.pools.len());
            let pc = cfg.pool.to_pool_config();
            assert!(pc.sweep_interval >= std::time::Duration::from_millis(1));
            let _ = cfg.exits.settings();
        }
        Err(e) => {
            assert!(!e.to_string().is_empty(), "empty config error message");
            if let ConfigError::Invalid { key, .. } = &e {
                assert!(!key.is_empty(), "Invalid without a key: {e:?}");
            }
        }
    }
});
