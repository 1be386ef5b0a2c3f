//! Fuzzes the worker authentication parsers in `edgepool::worker`:
//! `parse_proxy_authorization`, `parse_username`, `parse_session_header` (and, as a
//! cross-check, `WorkerAuth::authenticate`, which composes them).
//!
//! Invariants asserted (only what src/worker.rs guarantees):
//! * nothing panics;
//! * every error has a non-empty `.token()` and a non-empty message, and a `BadOption`
//!   echoes at most 32 characters of the option (`AuthError::option` truncates);
//! * `parse_proxy_authorization` Ok => the username has no ':' (it is split at the first ':');
//!   and `Basic base64(u:p)` decodes back to exactly `u` / `p` when `u` has no ':';
//! * `parse_username` Ok((token, opts)) => token contains no '-' and is the part before the
//!   first '-'; session/pool ids pass `validate_name`; `sesstime` is in 1..=1440; and the
//!   canonical re-spelling of (token, opts) parses back to the same value.
//!   NOTE: the token may be EMPTY (`""`, `"-session-a"` parse Ok): the grammar does not
//!   promise a non-empty token; `WorkerAuth::authenticate` rejects an empty username only when
//!   tokens are configured. So non-emptiness is deliberately NOT asserted.
//! * `parse_session_header` Ok => session/pool ids valid, `sesstime` in range;
//! * `authenticate` with auth disabled == `parse_proxy_authorization` + `parse_username`;
//!   with auth enabled, Ok only for a configured token.
#![no_main]

use base64::Engine as _;
use edgepool::worker::{
    parse_proxy_authorization, parse_session_header, parse_username, validate_name, AuthError,
    WorkerAuth, WorkerOptions, MAX_SESSION_MINUTES,
};
use libfuzzer_sys::fuzz_target;

fn check_err(e: &AuthError) {
    assert!(!e.token().is_empty(), "empty error token for {e:?}");
    assert!(!e.to_string().is_empty(), "empty error message for {e:?}");
    if let AuthError::BadOption { option, reason } = e {
        assert!(option.chars().count() <= 32, "option echo not truncated: {e:?}");
        assert!(!reason.is_empty(), "BadOption without a reason: {e:?}");
    }
}

fn check_opts(o: &WorkerOptions) {
    if let Some(s) = &o.session {
        assert!(validate_name(s).is_ok(), "invalid session id accepted: {s:?}");
    }
    if let Some(p) = &o.pool {
        assert!(validate_name(p).is_ok(), "invalid pool name accepted: {p:?}");
    }
    if let Some(m) = o.session_minutes {
        assert!((1..=MAX_SESSION_MINUTES).contains(&m), "sesstime out of range: {m}");
    }
}

/// The canonical spelling of a parsed username.
fn respell(token: &str, o: &WorkerOptions) -> String {
    let mut s = token.to_owned();
    if let Some(v) = &o.session {
        s += &format!("-session-{v}");
    }
    if let Some(m) = o.session_minutes {
        s += &format!("-sesstime-{m}");
    }
    if let Some(p) = &o.pool {
        s += &format!("-pool-{p}");
    }
    if let Some(r) = o.rotate {
        s += &format!("-rotate-{}", r.as_str());
    }
    if o.mitm_off {
        s += "-mitm-off";
    }
    s
}

fn check_username(username: &str) -> Option<(String, WorkerOptions)> {
    match parse_username(username) {
        Ok((token, opts)) => {
            assert!(!token.contains('-'), "token contains '-': {token:?}");
            assert_eq!(token, username.split('-').next().unwrap(), "token is not the first part");
            check_opts(&opts);
            let again = parse_username(&respell(&token, &opts))
                .expect("canonical re-spelling of an accepted username is refused");
            assert_eq!(again, (token.clone(), opts.clone()), "re-spelling round trip differs");
            Some((token, opts))
        }
        Err(e) => {
            check_err(&e);
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. The raw bytes as a Proxy-Authorization header value.
    let creds = match parse_proxy_authorization(data) {
        Ok(c) => {
            assert!(!c.username.contains(':'), "username contains ':'");
            Some(c)
        }
        Err(e) => {
            check_err(&e);
            assert!(matches!(e, AuthError::Malformed(_)), "unexpected error kind {e:?}");
            None
        }
    };
    let from_header = creds.as_ref().and_then(|c| check_username(&c.username));

    // 2. The raw bytes as the *decoded* credentials, so the fuzzer controls the username
    //    directly: `Basic base64(data)` must decode back to data split at its first ':'.
    let enc = base64::engine::general_purpose::STANDARD.encode(data);
    let wrapped = format!("Basic {enc}");
    match (std::str::from_utf8(data), parse_proxy_authorization(wrapped.as_bytes())) {
        (Ok(s), Ok(c)) => {
            let (u, p) = s.split_once(':').expect("Ok without ':' in the credentials");
            assert_eq!(c.username, u);
            assert_eq!(c.password, p);
        }
        (Ok(s), Err(e)) => {
            check_err(&e);
            assert!(!s.contains(':'), "valid Basic credentials refused: {e:?}");
        }
        (Err(_), Ok(_)) => panic!("non-UTF-8 credentials accepted"),
        (Err(_), Err(e)) => check_err(&e),
    }

    // 3. The raw bytes (if UTF-8) as a username.
    if let Ok(s) = std::str::from_utf8(data) {
        check_username(s);
    }

    // 4. The raw bytes as an X-Edgepool-Session header value.
    match parse_session_header(data) {
        Ok(o) => check_opts(&o),
        Err(e) => check_err(&e),
    }

    // 5. authenticate() must agree with the parsers it is built from.
    if let Ok(hv) = http::HeaderValue::from_bytes(data) {
        let disabled = WorkerAuth::new(&[]);
        match (disabled.authenticate(Some(&hv)), &creds) {
            (Ok(w), Some(_)) => {
                let (t, o) = from_header.clone().expect("authenticate Ok but parse_username Err");
                assert_eq!((w.token, w.options), (t, o));
            }
            (Ok(_), None) => panic!("authenticate Ok but parse_proxy_authorization Err"),
            (Err(e), Some(_)) => {
                check_err(&e);
                assert!(from_header.is_none(), "authenticate Err but parsers Ok: {e:?}");
            }
            (Err(e), None) => check_err(&e),
        }
        let configured = ["tok123".to_owned(), "team_b_x91q".to_owned()];
        let enabled = WorkerAuth::new(&configured);
        match enabled.authenticate(Some(&hv)) {
            Ok(w) => assert!(configured.contains(&w.token), "unknown token accepted"),
            Err(e) => check_err(&e),
        }
    }
});
