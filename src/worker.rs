//! worker: who a worker is and what it asks for — the `Proxy-Authorization` token, the
//! options carried in the proxy username (`<token>-session-<id>-pool-<name>-...`) and the
//! `X-Edgepool-Session` header that can override them per request.
//!
//! The token is the secret and lives in the username, as with Bright Data or Oxylabs proxy
//! usernames; the Basic password is ignored (clients can send anything, or nothing, there).
//! Username grammar, options in any order, each at most once:
//!
//! ```text
//! <token>[-session-<id>][-sesstime-<min>][-pool-<name>][-rotate-<request|session>][-mitm-<off|on>]
//! ```
//!
//! `sessid` and `sid` are aliases of `session`. Session ids and pool names are
//! `[A-Za-z0-9_]{1,64}`; `sesstime` is whole minutes `1..=1440`. Option names and the
//! keyword values (`request`, `session`, `off`, `on`) are matched ignoring ASCII case; ids
//! and pool names are kept as given. Tokens never contain `-` (see [`validate_token`]).
//!
//! No error message produced here ever contains a token, a username or a password.
use std::fmt;

use base64::Engine as _;
use subtle::{Choice, ConstantTimeEq};

/// Request header a worker may send to pick (or override) its session per request: either a
/// bare session id (`abc_1`) or an option list without a token (`session-abc-pool-dc`).
pub const SESSION_HEADER: &str = "x-edgepool-session";

/// Longest token [`validate_token`] accepts, in bytes.
pub const MAX_TOKEN_LEN: usize = 128;

/// Longest session id or pool name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest `sesstime` value, in minutes (one day).
pub const MAX_SESSION_MINUTES: u32 = 1440;

/// When a sticky session's exit is rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotate {
    /// A fresh exit for every request (`-rotate-request`).
    Request,
    /// One exit for the session's lifetime (`-rotate-session`).
    Session,
}

impl Rotate {
    /// The option value spelling: `request` or `session`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rotate::Request => "request",
            Rotate::Session => "session",
        }
    }
}

/// What a worker asked for in its username or `X-Edgepool-Session` header. `None` / `false`
/// means "not given": the configured default applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Sticky session id (`-session-<id>`, aliases `sessid`, `sid`).
    pub session: Option<String>,
    /// Session lifetime in minutes (`-sesstime-<min>`), `1..=1440`.
    pub session_minutes: Option<u32>,
    /// Exit pool name (`-pool-<name>`).
    pub pool: Option<String>,
    /// Exit rotation (`-rotate-request` / `-rotate-session`).
    pub rotate: Option<Rotate>,
    /// `-mitm-off`: blind-tunnel CONNECTs instead of intercepting TLS. `-mitm-on` leaves
    /// this `false` (the configured behaviour).
    pub mitm_off: bool,
}

impl WorkerOptions {
    /// Overlays `other` (e.g. the `X-Edgepool-Session` header) on self: every field set in
    /// `other` (`Some`, or `mitm_off == true`) replaces self's; unset fields keep self's value.
    /// Note `mitm_off` can only be turned on by an overlay, never back off.
    pub fn overlay(&mut self, other: &WorkerOptions) {
        if let Some(s) = &other.session {
            self.session = Some(s.clone());
        }
        if let Some(m) = other.session_minutes {
            self.session_minutes = Some(m);
        }
        if let Some(p) = &other.pool {
            self.pool = Some(p.clone());
        }
        if let Some(r) = other.rotate {
            self.rotate = Some(r);
        }
        if other.mitm_off {
            self.mitm_off = true;
        }
    }
}

/// Decoded HTTP Basic credentials. `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The username (for workers: token and options).
    pub username: String,
    /// The password (ignored for workers).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a worker's proxy authentication or options were refused. Messages never contain the
/// token, username or password.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// Worker tokens are configured and the request has no `Proxy-Authorization`.
    #[error("proxy authentication required: send Proxy-Authorization: Basic base64(<token>:)")]
    Missing,
    /// `Proxy-Authorization` is not usable: not Basic, bad base64, no `:`, not UTF-8, or an
    /// empty username while tokens are configured.
    #[error("malformed Proxy-Authorization: {0}")]
    Malformed(String),
    /// The token is not one of the configured worker tokens.
    #[error("proxy authentication failed: unknown worker token")]
    BadToken,
    /// An option in the username or `X-Edgepool-Session` is unknown, repeated or invalid.
    #[error("proxy option {option:?}: {reason}")]
    BadOption {
        /// The option as the worker wrote it (or `x-edgepool-session`).
        option: String,
        /// What is wrong and the rule it breaks.
        reason: String,
    },
}

impl AuthError {
    /// Machine token for `X-Edgepool-Error`: `proxy_auth_required`, `proxy_auth_malformed`,
    /// `proxy_auth_failed` or `bad_proxy_option`.
    pub fn token(&self) -> &'static str {
        self.kind().token()
    }

    /// The error kind a worker gets for it (407).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            AuthError::Missing => ErrorKind::ProxyAuthRequired,
            AuthError::Malformed(_) => ErrorKind::ProxyAuthMalformed,
            AuthError::BadToken => ErrorKind::ProxyAuthFailed,
            AuthError::BadOption { .. } => ErrorKind::BadProxyOption,
        }
    }

    fn option(option: &str, reason: impl Into<String>) -> Self {
        // Option names are echoed back; keep them short so a garbage username cannot bloat
        // the error (Display escapes control characters).
        let option: String = option.chars().take(32).collect();
        AuthError::BadOption {
            option,
            reason: reason.into(),
        }
    }
}

/// Parses a `Proxy-Authorization` value (`Basic base64(user:pass)`, scheme case-insensitive,
/// surrounding whitespace tolerated, base64 padding optional). The password may contain `:`;
/// the username may not.
pub fn parse_proxy_authorization(value: &[u8]) -> Result<Credentials, AuthError> {
    let value = value.trim_ascii();
    let split = value
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .ok_or_else(|| AuthError::Malformed("expected \"Basic <base64>\"".into()))?;
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return Err(AuthError::Malformed(
            "only the Basic scheme is supported".into(),
        ));
    }
    let encoded = rest.trim_ascii();
    const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let decoded = LENIENT
        .decode(encoded)
        .map_err(|_| AuthError::Malformed("credentials are not valid base64".into()))?;
    let decoded = String::from_utf8(decoded)
        .map_err(|_| AuthError::Malformed("credentials are not UTF-8".into()))?;
    let (username, password) = decoded.split_once(':').ok_or_else(|| {
        AuthError::Malformed("credentials have no ':' between username and password".into())
    })?;
    Ok(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// `<token>[-name-value]...` → (token, options). Unknown option → `BadOption` naming it and
/// listing the known ones; an option given twice (aliases count as the same option) →
/// `BadOption` "given twice"; a missing value → "needs a value"; a bad value → the rule.
pub fn parse_username(username: &str) -> Result<(String, WorkerOptions), AuthError> {
    let mut parts = username.split('-');
    let token = parts.next().unwrap_or_default().to_owned();
    let options = parse_parts(parts)?;
    Ok((token, options))
}

/// Options without a token: `session-abc-pool-dc`. The empty string gives no options.
pub fn parse_options(s: &str) -> Result<WorkerOptions, AuthError> {
    if s.is_empty() {
        return Ok(WorkerOptions::default());
    }
    parse_parts(s.split('-'))
}

/// `X-Edgepool-Session` header value: a bare id (`abc_1`) → session only; a value containing
/// `-` → [`parse_options`]. Surrounding whitespace is ignored. Invalid UTF-8 or a bad bare
/// id → `BadOption { option: "x-edgepool-session", .. }`.
pub fn parse_session_header(value: &[u8]) -> Result<WorkerOptions, AuthError> {
    let value = std::str::from_utf8(value)
        .map_err(|_| AuthError::option(SESSION_HEADER, "header value is not UTF-8"))?
        .trim();
    if value.contains('-') {
        return parse_options(value);
    }
    validate_name(value).map_err(|reason| AuthError::option(SESSION_HEADER, reason.to_string()))?;
    Ok(WorkerOptions {
        session: Some(value.to_owned()),
        ..WorkerOptions::default()
    })
}

/// The options a username may carry, after alias folding.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opt {
    Session,
    SessTime,
    Pool,
    Rotate,
    Mitm,
}

const KNOWN_OPTIONS: &str = "session (aliases sessid, sid), sesstime, pool, rotate, mitm";

impl Opt {
    fn parse(name: &str) -> Option<Opt> {
        let lower = name.to_ascii_lowercase();
        Some(match lower.as_str() {
            "session" | "sessid" | "sid" => Opt::Session,
            "sesstime" => Opt::SessTime,
            "pool" => Opt::Pool,
            "rotate" => Opt::Rotate,
            "mitm" => Opt::Mitm,
            _ => return None,
        })
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

fn parse_parts<'a>(mut parts: impl Iterator<Item = &'a str>) -> Result<WorkerOptions, AuthError> {
    let mut out = WorkerOptions::default();
    let mut seen = 0u8;
    while let Some(name) = parts.next() {
        if name.is_empty() {
            return Err(AuthError::option(
                name,
                "empty option name (a stray or doubled '-')",
            ));
        }
        let opt = Opt::parse(name).ok_or_else(|| {
            AuthError::option(
                name,
                format!("unknown option; known options: {KNOWN_OPTIONS}"),
            )
        })?;
        let value = parts
            .next()
            .ok_or_else(|| AuthError::option(name, "needs a value"))?;
        if seen & opt.bit() != 0 {
            let reason = if opt == Opt::Session {
                "given twice (session, sessid and sid are the same option)"
            } else {
                "given twice"
            };
            return Err(AuthError::option(name, reason));
        }
        seen |= opt.bit();
        match opt {
            Opt::Session => {
                validate_name(value).map_err(|r| AuthError::option(name, r.to_string()))?;
                out.session = Some(value.to_owned());
            }
            Opt::Pool => {
                validate_name(value).map_err(|r| AuthError::option(name, r.to_string()))?;
                out.pool = Some(value.to_owned());
            }
            Opt::SessTime => {
                out.session_minutes = Some(parse_minutes(value).ok_or_else(|| {
                    AuthError::option(
                        name,
                        format!("must be a whole number of minutes 1..={MAX_SESSION_MINUTES}"),
                    )
                })?);
            }
            Opt::Rotate => {
                out.rotate = Some(if value.eq_ignore_ascii_case("request") {
                    Rotate::Request
                } else if value.eq_ignore_ascii_case("session") {
                    Rotate::Session
                } else {
                    return Err(AuthError::option(
                        name,
                        "must be \"request\" or \"session\"",
                    ));
                });
            }
            Opt::Mitm => {
                out.mitm_off = if value.eq_ignore_ascii_case("off") {
                    true
                } else if value.eq_ignore_ascii_case("on") {
                    false
                } else {
                    return Err(AuthError::option(name, "must be \"off\" or \"on\""));
                };
            }
        }
    }
    Ok(out)
}

fn parse_minutes(value: &str) -> Option<u32> {
    if value.is_empty() || value.len() > 4 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let m: u32 = value.parse().ok()?;
    (1..=MAX_SESSION_MINUTES).contains(&m).then_some(m)
}

/// The configured worker tokens. With none configured, authentication is disabled and
/// workers are anonymous (a username, if sent, still scopes their sessions).
pub struct WorkerAuth {
    /// Each token zero-padded to `width` bytes, with its real length.
    tokens: Vec<(Vec<u8>, u64)>,
    /// Padded width: the longest configured token (at least 1).
    width: usize,
}

impl fmt::Debug for WorkerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerAuth")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

/// An authenticated (or anonymous) worker. `Debug` redacts the token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Worker {
    /// The token from the username (empty for anonymous workers). A secret: do not log it.
    pub token: String,
    /// The options from the username.
    pub options: WorkerOptions,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = if self.token.is_empty() {
            ""
        } else {
            "<redacted>"
        };
        f.debug_struct("Worker")
            .field("token", &token)
            .field("options", &self.options)
            .finish()
    }
}

impl WorkerAuth {
    /// Builds the checker from the configured tokens (validate them with
    /// [`validate_token`] first). An empty list disables authentication.
    pub fn new(tokens: &[String]) -> Self {
        let width = tokens.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        let tokens = tokens
            .iter()
            .map(|t| {
                let mut padded = vec![0u8; width];
                padded[..t.len()].copy_from_slice(t.as_bytes());
                (padded, t.len() as u64)
            })
            .collect();
        WorkerAuth { tokens, width }
    }

    /// True when tokens are configured.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// From a request's `Proxy-Authorization` header (`None` if absent).
    ///
    /// Disabled + absent → anonymous `Worker::default()`. Disabled + present → parsed, the
    /// token taken as-is and unchecked (it still scopes sessions). Enabled + absent →
    /// [`AuthError::Missing`]. Enabled + present → the token must equal a configured one,
    /// compared in constant time against every configured token, else
    /// [`AuthError::BadToken`]. The token is checked before the options are parsed, so a
    /// worker with a wrong token never learns anything about its options.
    pub fn authenticate(&self, header: Option<&http::HeaderValue>) -> Result<Worker, AuthError> {
        let Some(header) = header else {
            return if self.enabled() {
                Err(AuthError::Missing)
            } else {
                Ok(Worker::default())
            };
        };
        let creds = parse_proxy_authorization(header.as_bytes())?;
        if self.enabled() && creds.username.is_empty() {
            return Err(AuthError::Malformed(
                "empty username; the worker token goes in the username".into(),
            ));
        }
        let (token, rest) = match creds.username.split_once('-') {
            Some((token, rest)) => (token, Some(rest)),
            None => (creds.username.as_str(), None),
        };
        if self.enabled() && !self.check(token.as_bytes()) {
            return Err(AuthError::BadToken);
        }
        let options = match rest {
            Some(rest) => parse_parts(rest.split('-'))?,
            None => WorkerOptions::default(),
        };
        Ok(Worker {
            token: token.to_owned(),
            options,
        })
    }

    /// Constant-time membership test: every configured token is compared over the same
    /// padded width, whatever the candidate's length and whichever token matches.
    fn check(&self, candidate: &[u8]) -> bool {
        let mut padded = vec![0u8; self.width];
        let n = candidate.len().min(self.width);
        padded[..n].copy_from_slice(&candidate[..n]);
        let len = candidate.len() as u64;
        let mut found = Choice::from(0);
        for (token, token_len) in &self.tokens {
            found |= padded.ct_eq(token) & len.ct_eq(token_len);
        }
        found.into()
    }
}

/// Checks a configured token's form: non-empty, at most 128 bytes, only
/// `A-Z a-z 0-9 _ . ~ + / =` (so never `-`, which separates options, nor `:`).
/// `Err(reason)` for config validation; the reason never contains the token.
pub fn validate_token(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    if let Some(c) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.~+/=".contains(*c)))
    {
        return Err(match c {
            '-' => TokenError::Dash,
            ':' => TokenError::Colon,
            _ => TokenError::Character,
        });
    }
    Ok(())
}

/// Why a configured worker token is refused ([`validate_token`]); never contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is empty.
    #[error("worker token is empty")]
    Empty,
    /// The token is longer than [`MAX_TOKEN_LEN`] bytes.
    #[error("worker token is longer than {MAX_TOKEN_LEN} characters")]
    TooLong,
    /// The token contains `-`.
    #[error("worker token contains '-' (it separates username options)")]
    Dash,
    /// The token contains `:`.
    #[error("worker token contains ':' (it separates username and password)")]
    Colon,
    /// The token contains another character outside its alphabet.
    #[error("worker token contains a character outside A-Z a-z 0-9 _ . ~ + / =")]
    Character,
}

/// Checks a session id's or pool name's form: `[A-Za-z0-9_]{1,64}`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(NameError);
    }
    Ok(())
}

/// A session id or pool name not of the form `[A-Za-z0-9_]{1,64}` ([`validate_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _")]
pub struct NameError;

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn basic(userpass: &str) -> HeaderValue {
        let enc = base64::engine::general_purpose::STANDARD.encode(userpass);
        HeaderValue::from_str(&format!("Basic {enc}")).unwrap()
    }

    fn opts(
        session: Option<&str>,
        minutes: Option<u32>,
        pool: Option<&str>,
        rotate: Option<Rotate>,
        mitm_off: bool,
    ) -> WorkerOptions {
        WorkerOptions {
            session: session.map(str::to_owned),
            session_minutes: minutes,
            pool: pool.map(str::to_owned),
            rotate,
            mitm_off,
        }
    }

    fn bad_option(e: AuthError) -> (String, String) {
        match e {
            AuthError::BadOption { option, reason } => (option, reason),
            other => panic!("expected BadOption, got {other:?}"),
        }
    }

    #[test]
    fn usernames_parse_every_option_and_alias() {
        let cases: &[(&str, &str, WorkerOptions)] = &[
            ("tok", "tok", WorkerOptions::default()),
            (
                "tok-session-abc",
                "tok",
                opts(Some("abc"), None, None, None, false),
            ),
            (
                "tok-sessid-abc",
                "tok",
                opts(Some("abc"), None, None, None, false),
            ),
            (
                "tok-sid-A_9",
                "tok",
                opts(Some("A_9"), None, None, None, false),
            ),
            (
                "tok-SESSION-abc",
                "tok",
                opts(Some("abc"), None, None, None, false),
            ),
            (
                "tok-sesstime-1",
                "tok",
                opts(None, Some(1), None, None, false),
            ),
            (
                "tok-sesstime-1440",
                "tok",
                opts(None, Some(1440), None, None, false),
            ),
            (
                "tok-sesstime-0030",
                "tok",
                opts(None, Some(30), None, None, false),
            ),
            (
                "tok-pool-dc_eu",
                "tok",
                opts(None, None, Some("dc_eu"), None, false),
            ),
            (
                "tok-rotate-request",
                "tok",
                opts(None, None, None, Some(Rotate::Request), false),
            ),
            (
                "tok-rotate-Session",
                "tok",
                opts(None, None, None, Some(Rotate::Session), false),
            ),
            ("tok-mitm-off", "tok", opts(None, None, None, None, true)),
            ("tok-mitm-OFF", "tok", opts(None, None, None, None, true)),
            ("tok-mitm-on", "tok", opts(None, None, None, None, false)),
            (
                "tok-session-s1-sesstime-10-pool-resi-rotate-session-mitm-off",
                "tok",
                opts(
                    Some("s1"),
                    Some(10),
                    Some("resi"),
                    Some(Rotate::Session),
                    true,
                ),
            ),
            ("", "", WorkerOptions::default()),
            ("-sid-x", "", opts(Some("x"), None, None, None, false)),
            ("a.b~c+d/e=", "a.b~c+d/e=", WorkerOptions::default()),
        ];
        for (input, token, want) in cases {
            let (t, o) = parse_username(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&t, token, "{input}");
            assert_eq!(&o, want, "{input}");
        }
    }

    #[test]
    fn option_order_does_not_matter() {
        let want = opts(
            Some("s1"),
            Some(10),
            Some("resi"),
            Some(Rotate::Request),
            true,
        );
        for input in [
            "t-session-s1-sesstime-10-pool-resi-rotate-request-mitm-off",
            "t-mitm-off-rotate-request-pool-resi-sesstime-10-session-s1",
            "t-pool-resi-sid-s1-mitm-off-sesstime-10-rotate-request",
            "t-rotate-request-sessid-s1-pool-resi-mitm-off-sesstime-10",
        ] {
            let (t, o) = parse_username(input).unwrap();
            assert_eq!(t, "t");
            assert_eq!(o, want, "{input}");
        }
    }

    #[test]
    fn option_errors_name_the_option_and_the_rule() {
        let long = "x".repeat(65);
        let cases: Vec<(String, &str, &str)> = vec![
            (
                "t-colour-red".into(),
                "colour",
                "unknown option; known options: session",
            ),
            ("t-session".into(), "session", "needs a value"),
            ("t-pool-a-sesstime".into(), "sesstime", "needs a value"),
            ("t-session-a-session-b".into(), "session", "given twice"),
            (
                "t-session-a-sid-b".into(),
                "sid",
                "given twice (session, sessid and sid",
            ),
            ("t-sessid-a-sid-b".into(), "sid", "given twice"),
            ("t-pool-a-pool-b".into(), "pool", "given twice"),
            ("t-mitm-off-mitm-on".into(), "mitm", "given twice"),
            (
                "t-rotate-request-rotate-session".into(),
                "rotate",
                "given twice",
            ),
            ("t-sesstime-1-sesstime-2".into(), "sesstime", "given twice"),
            (
                "t-session-a.b".into(),
                "session",
                "must be 1 to 64 characters",
            ),
            (format!("t-session-{long}"), "session", "must be 1 to 64"),
            ("t-sid-".into(), "sid", "must be 1 to 64"),
            ("t-pool-é".into(), "pool", "must be 1 to 64"),
            ("t-sesstime-0".into(), "sesstime", "1..=1440"),
            ("t-sesstime-1441".into(), "sesstime", "1..=1440"),
            ("t-sesstime-+5".into(), "sesstime", "1..=1440"),
            ("t-sesstime-1.5".into(), "sesstime", "1..=1440"),
            ("t-sesstime-99999999999".into(), "sesstime", "1..=1440"),
            (
                "t-rotate-always".into(),
                "rotate",
                "must be \"request\" or \"session\"",
            ),
            ("t-mitm-maybe".into(), "mitm", "must be \"off\" or \"on\""),
            ("t-".into(), "", "empty option name"),
            ("t--session-a".into(), "", "empty option name"),
            ("t-session-a-".into(), "", "empty option name"),
        ];
        for (input, option, reason) in cases {
            let e = parse_username(&input).unwrap_err();
            assert_eq!(e.token(), "bad_proxy_option", "{input}");
            let (o, r) = bad_option(e);
            assert_eq!(o, option, "{input}");
            assert!(r.contains(reason), "{input}: {r}");
        }
    }

    #[test]
    fn bad_option_display_format() {
        let e = parse_username("t-sesstime-0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "proxy option \"sesstime\": must be a whole number of minutes 1..=1440"
        );
        let e = parse_username("t-bogus-1").unwrap_err().to_string();
        assert!(e.contains("\"bogus\""), "{e}");
        for name in [
            "session", "sessid", "sid", "sesstime", "pool", "rotate", "mitm",
        ] {
            assert!(e.contains(name), "{e} lists {name}");
        }
        // Echoed option names are escaped and capped.
        let e = parse_username(&format!("t-a\r\nb{}-1", "z".repeat(100)))
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\r') && !e.contains('\n'), "{e}");
        assert!(!e.contains(&"z".repeat(40)), "{e}");
    }

    #[test]
    fn parse_options_without_token() {
        assert_eq!(parse_options("").unwrap(), WorkerOptions::default());
        assert_eq!(
            parse_options("session-abc-pool-dc").unwrap(),
            opts(Some("abc"), None, Some("dc"), None, false)
        );
        assert_eq!(
            parse_options("mitm-off").unwrap(),
            opts(None, None, None, None, true)
        );
        let (o, _) = bad_option(parse_options("abc").unwrap_err());
        assert_eq!(o, "abc");
        let (o, r) = bad_option(parse_options("session").unwrap_err());
        assert_eq!((o.as_str(), r.as_str()), ("session", "needs a value"));
    }

    #[test]
    fn proxy_authorization_parsing() {
        let ok: &[(&[u8], &str, &str)] = &[
            (b"Basic dXNlcjpwYXNz", "user", "pass"),
            (b"basic dXNlcjpwYXNz", "user", "pass"),
            (b"BASIC   dXNlcjpwYXNz  ", "user", "pass"),
            (b"  Basic\tdXNlcjpwYXNz", "user", "pass"),
            // "user:pa:ss" — the password may contain ':'.
            (b"Basic dXNlcjpwYTpzcw==", "user", "pa:ss"),
            // Missing padding tolerated: "u:p" is dTpw, "ab:" is YWI6.
            (b"Basic dTpw", "u", "p"),
            (b"Basic YWI6", "ab", ""),
            // ":" alone.
            (b"Basic Og==", "", ""),
            (b"Basic Og", "", ""),
        ];
        for (input, user, pass) in ok {
            let c = parse_proxy_authorization(input)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(input)));
            assert_eq!(c.username, *user);
            assert_eq!(c.password, *pass);
        }
        let bad: &[(&[u8], &str)] = &[
            (b"", "expected"),
            (b"Basic", "expected"),
            (b"Basicx dXNlcjpwYXNz", "only the Basic"),
            (b"Bearer abc", "only the Basic"),
            (b"Digest username=\"a\"", "only the Basic"),
            (b"Basic !!!notbase64", "base64"),
            (b"Basic dXNlcjpwYXNz dXNl", "base64"),
            // "userpass" without ':'.
            (b"Basic dXNlcnBhc3M=", "no ':'"),
            // 0xff 0xfe ':' 'a' — not UTF-8.
            (b"Basic //46YQ==", "not UTF-8"),
        ];
        for (input, why) in bad {
            match parse_proxy_authorization(input) {
                Err(AuthError::Malformed(m)) => {
                    assert!(m.contains(why), "{}: {m}", String::from_utf8_lossy(input))
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(input)),
            }
        }
    }

    #[test]
    fn credentials_debug_redacts_password() {
        let c = parse_proxy_authorization(basic("user:hunter2").as_bytes()).unwrap();
        let d = format!("{c:?}");
        assert!(d.contains("user") && !d.contains("hunter2"), "{d}");
    }

    #[test]
    fn authenticate_with_tokens() {
        let auth = WorkerAuth::new(&["alpha".into(), "b3ta_long_token".into(), "c".into()]);
        assert!(auth.enabled());
        for token in ["alpha", "b3ta_long_token", "c"] {
            let w = auth
                .authenticate(Some(&basic(&format!("{token}:ignored"))))
                .unwrap();
            assert_eq!(w.token, token);
            assert_eq!(w.options, WorkerOptions::default());
        }
        let w = auth
            .authenticate(Some(&basic("alpha-session-s1-pool-dc-mitm-off:")))
            .unwrap();
        assert_eq!(w.token, "alpha");
        assert_eq!(w.options, opts(Some("s1"), None, Some("dc"), None, true));

        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            auth.authenticate(None).unwrap_err().token(),
            "proxy_auth_required"
        );
        for wrong in [
            "alph",
            "alphaa",
            "ALPHA",
            "b3ta_long_toke",
            "cc",
            "",
            "x".repeat(500).as_str(),
        ] {
            let e = auth.authenticate(Some(&basic(&format!("{wrong}-session-s1:pw"))));
            assert_eq!(e, Err(AuthError::BadToken), "{wrong}");
        }
        let e = auth.authenticate(Some(&basic(":pw"))).unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)), "{e:?}");
        assert_eq!(e.token(), "proxy_auth_malformed");
        let e = auth
            .authenticate(Some(&HeaderValue::from_static("Bearer alpha")))
            .unwrap_err();
        assert_eq!(e.token(), "proxy_auth_malformed");
        // A bad token is reported before any option problem.
        let e = auth
            .authenticate(Some(&basic("nope-bogus-1:")))
            .unwrap_err();
        assert_eq!(e, AuthError::BadToken);
        // A good token with a bad option.
        let e = auth
            .authenticate(Some(&basic("alpha-sesstime-0:")))
            .unwrap_err();
        assert_eq!(e.token(), "bad_proxy_option");
    }

    #[test]
    fn bad_token_never_echoes_secrets() {
        let auth = WorkerAuth::new(&["realtoken".into()]);
        let e = auth
            .authenticate(Some(&basic("guessedtoken-session-abc:secretpw")))
            .unwrap_err();
        assert_eq!(e.token(), "proxy_auth_failed");
        let msg = e.to_string();
        for secret in ["guessedtoken", "realtoken", "secretpw", "session-abc"] {
            assert!(!msg.contains(secret), "{msg}");
            assert!(!format!("{e:?}").contains(secret));
        }
        assert!(!format!("{auth:?}").contains("realtoken"));
        let w = auth.authenticate(Some(&basic("realtoken:"))).unwrap();
        assert!(!format!("{w:?}").contains("realtoken"));
    }

    #[test]
    fn authenticate_without_tokens() {
        let auth = WorkerAuth::new(&[]);
        assert!(!auth.enabled());
        assert_eq!(auth.authenticate(None).unwrap(), Worker::default());
        let w = auth
            .authenticate(Some(&basic("anyone-sid-s9-rotate-request:x")))
            .unwrap();
        assert_eq!(w.token, "anyone");
        assert_eq!(
            w.options,
            opts(Some("s9"), None, None, Some(Rotate::Request), false)
        );
        assert_eq!(
            auth.authenticate(Some(&basic(":"))).unwrap(),
            Worker::default()
        );
        // Options are still validated, and the header must still be well-formed.
        assert_eq!(
            auth.authenticate(Some(&basic("a-pool-:")))
                .unwrap_err()
                .token(),
            "bad_proxy_option"
        );
        assert_eq!(
            auth.authenticate(Some(&HeaderValue::from_static("Basic ***")))
                .unwrap_err()
                .token(),
            "proxy_auth_malformed"
        );
    }

    #[test]
    fn constant_time_check_handles_lengths() {
        let auth = WorkerAuth::new(&["ab".into(), "abcd".into()]);
        assert!(auth.check(b"ab"));
        assert!(auth.check(b"abcd"));
        assert!(!auth.check(b"abc"));
        assert!(!auth.check(b"a"));
        assert!(!auth.check(b""));
        assert!(!auth.check(b"abcde"));
        // Zero padding must not make "ab\0\0" equal "ab".
        assert!(!auth.check(b"ab\0\0"));
        assert!(!auth.check(b"ab\0"));
    }

    #[test]
    fn overlay_replaces_only_set_fields() {
        let mut base = opts(
            Some("s1"),
            Some(10),
            Some("resi"),
            Some(Rotate::Session),
            false,
        );
        base.overlay(&WorkerOptions::default());
        assert_eq!(
            base,
            opts(
                Some("s1"),
                Some(10),
                Some("resi"),
                Some(Rotate::Session),
                false
            )
        );

        base.overlay(&opts(Some("s2"), None, None, None, false));
        assert_eq!(
            base,
            opts(
                Some("s2"),
                Some(10),
                Some("resi"),
                Some(Rotate::Session),
                false
            )
        );

        base.overlay(&opts(
            None,
            Some(5),
            Some("dc"),
            Some(Rotate::Request),
            true,
        ));
        assert_eq!(
            base,
            opts(Some("s2"), Some(5), Some("dc"), Some(Rotate::Request), true)
        );

        // mitm_off false in the overlay does not turn it back on.
        base.overlay(&opts(None, None, None, None, false));
        assert!(base.mitm_off);

        let mut empty = WorkerOptions::default();
        let full = opts(Some("a"), Some(1), Some("p"), Some(Rotate::Request), true);
        empty.overlay(&full);
        assert_eq!(empty, full);
    }

    #[test]
    fn session_header_parsing() {
        let ok: &[(&[u8], WorkerOptions)] = &[
            (b"abc_1", opts(Some("abc_1"), None, None, None, false)),
            (b"  abc_1 ", opts(Some("abc_1"), None, None, None, false)),
            (
                b"session-abc-pool-dc",
                opts(Some("abc"), None, Some("dc"), None, false),
            ),
            (
                b"sid-x-sesstime-60",
                opts(Some("x"), Some(60), None, None, false),
            ),
            (b"mitm-off", opts(None, None, None, None, true)),
            // A bare word that is an option name is still a session id.
            (b"pool", opts(Some("pool"), None, None, None, false)),
        ];
        for (input, want) in ok {
            assert_eq!(&parse_session_header(input).unwrap(), want);
        }
        let bad: &[(&[u8], &str)] = &[
            (b"", SESSION_HEADER),
            (b"a.b", SESSION_HEADER),
            (b"\xff\xfe", SESSION_HEADER),
            (b"session-a.b", "session"),
            (b"bogus-1", "bogus"),
            (b"session-a-sid-b", "sid"),
        ];
        for (input, option) in bad {
            let e = parse_session_header(input).unwrap_err();
            assert_eq!(e.token(), "bad_proxy_option");
            assert_eq!(
                bad_option(e).0,
                *option,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let (_, r) = bad_option(parse_session_header(&[b'x'; 65]).unwrap_err());
        assert!(r.contains("1 to 64"), "{r}");
    }

    #[test]
    fn token_and_name_validation() {
        for ok in ["a", "Abc_123", "a.b~c+d/e=", &"t".repeat(128)] {
            assert_eq!(validate_token(ok), Ok(()), "{ok}");
        }
        let bad = [
            ("", "empty"),
            (&*"t".repeat(129), "longer than 128"),
            ("ab-cd", "'-'"),
            ("ab:cd", "':'"),
            ("ab cd", "outside"),
            ("abé", "outside"),
        ];
        for (token, why) in bad {
            let e = validate_token(token).unwrap_err().to_string();
            assert!(e.contains(why), "{token}: {e}");
            if token.len() > 1 {
                assert!(!e.contains(token), "{e}");
            }
        }
        for ok in ["a", "A_9", &"n".repeat(64)] {
            assert_eq!(validate_name(ok), Ok(()));
        }
        for bad in ["", "a-b", "a.b", "a b", "é", &"n".repeat(65)] {
            assert_eq!(validate_name(bad), Err(NameError), "{bad}");
        }
        assert_eq!(validate_token("ab-cd"), Err(TokenError::Dash));
        assert_eq!(validate_token("ab:cd"), Err(TokenError::Colon));
        assert_eq!(validate_token(&"t".repeat(129)), Err(TokenError::TooLong));
    }

    #[test]
    fn error_tokens() {
        assert_eq!(AuthError::Missing.token(), "proxy_auth_required");
        assert_eq!(
            AuthError::Malformed(String::new()).token(),
            "proxy_auth_malformed"
        );
        assert_eq!(AuthError::BadToken.token(), "proxy_auth_failed");
        assert_eq!(
            AuthError::BadOption {
                option: String::new(),
                reason: String::new()
            }
            .token(),
            "bad_proxy_option"
        );
        assert_eq!(Rotate::Request.as_str(), "request");
        assert_eq!(Rotate::Session.as_str(), "session");
    }
}
