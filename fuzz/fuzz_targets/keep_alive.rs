//! Fuzzes `edgepool::headers::parse_keep_alive` (the `Keep-Alive: timeout=N, max=M` response
//! header). The function documents no numeric bounds (any u64 is accepted for both), so the
//! invariants are structural:
//! * nothing panics;
//! * `idle_timeout`, when set, is whole seconds (`Duration::from_secs`);
//! * a hint is only set when its key and a value appear: no '=' in the input => no hints;
//!   `idle_timeout` set => "timeout" occurs (ASCII-case-insensitively) and the decimal
//!   spelling of N occurs in the input; likewise `remaining_requests` / "max";
//! * it is deterministic, and appending a junk element (`, x`) changes nothing
//!   ("junk ignored").
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = std::str::from_utf8(data) else {
        return;
    };
    let h = edgepool::headers::parse_keep_alive(v);
    assert_eq!(h, edgepool::headers::parse_keep_alive(v), "not deterministic");
    let lower = v.to_ascii_lowercase();
    if !v.contains('=') {
        assert_eq!(h, Default::default(), "hints without any '='");
    }
    if let Some(d) = h.idle_timeout {
        assert_eq!(d.subsec_nanos(), 0, "timeout not whole seconds");
        assert!(lower.contains("timeout"), "timeout hint without a timeout key");
        assert!(v.contains(&d.as_secs().to_string()), "timeout value not in the input");
    }
    if let Some(n) = h.remaining_requests {
        assert!(lower.contains("max"), "max hint without a max key");
        assert!(v.contains(&n.to_string()), "max value not in the input");
    }
    let junk = format!("{v}, x");
    assert_eq!(edgepool::headers::parse_keep_alive(&junk), h, "trailing junk changed the hints");
});
