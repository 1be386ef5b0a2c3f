//! cli: the command line's library half. The binary (`main.rs`) only parses arguments; what
//! each subcommand does lives here, so it is tested in-process:
//! - [`serve`]: `serve` (command-line overrides on a config, the listeners, the start line),
//!   `check`, and `ca path|export` (which never create a CA).
//! - [`admin`]: the admin-listener client, and the `status`, `report` and `trace` commands
//!   that fetch from it.
//! - [`format`]: what `status` and `trace` print, as pure functions of the admin documents.
//! - [`fleet`]: `status --fleet`, several gateways' `/status` added up.
//! - [`lab`]: `edgepool lab`'s argument rules and run (feature `lab`).
//!
//! Commands return typed errors ([`CliError`], [`lab::LabError`]); the binary prints them
//! as `edgepool: <error>` and exits non-zero ([`finish`]).
use std::ffi::OsStr;
use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

pub mod admin;
pub mod fleet;
pub mod format;
#[cfg(feature = "lab")]
pub mod lab;
pub mod serve;

pub use admin::{admin_get, AdminError};
pub use format::{
    exit_state_text, rate_text, reachable_url, status_table, trace_text, verdict_text,
};

/// Why a subcommand failed; the Display text is what the user reads after `edgepool: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A configuration file given on the command line does not load.
    #[error("{}: {source}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// Why (names the bad key).
        #[source]
        source: crate::config::ConfigError,
    },
    /// An `--exit POOL=URL` argument is malformed.
    #[error("--exit: {reason}")]
    ExitArg {
        /// What is wrong (never echoes the URL's userinfo).
        reason: crate::config::CliExitError,
    },
    /// The configuration with the command-line overrides applied is invalid.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A listener address cannot be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The configuration key it came from (`listen.proxy`, `listen.admin`).
        key: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The gateway could not start.
    #[error("{0}")]
    Start(#[from] crate::gateway::StartError),
    /// The bound listeners' addresses cannot be read.
    #[error("cannot read the listening addresses")]
    LocalAddr(#[source] io::Error),
    /// The interception CA cannot be read.
    #[error("{0}")]
    Ca(#[from] crate::ca::CaError),
    /// The admin listener could not be asked.
    #[error("{0}")]
    Admin(#[from] AdminError),
    /// The admin listener's answer is not the document expected.
    #[error("unexpected {path} answer: {source}")]
    Answer {
        /// The admin path (`/status`, `/report`).
        path: &'static str,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A `--window` the report store cannot answer.
    #[error("{0}")]
    Window(#[source] crate::report::ReportError),
    /// The async runtime cannot be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

/// A multi-threaded tokio runtime for one command.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    runtime_with_threads(0)
}

/// A multi-threaded tokio runtime with `threads` workers (0: tokio's default, one per CPU or
/// `TOKIO_WORKER_THREADS`).
pub fn runtime_with_threads(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.enable_all().build()
}

/// The exit code of a command, printing its error as `edgepool: <error>` on stderr.
pub fn finish<E: Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", failure_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The line a failed command prints.
pub fn failure_text(e: &dyn Display) -> String {
    format!("edgepool: {e}")
}

/// Whether log lines are coloured: only for a person at a terminal (log files and journald
/// get plain text), and never with a non-empty `NO_COLOR`.
pub fn log_colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Logs to stderr at `info` (`warn` when `quiet`) unless `RUST_LOG` says otherwise, coloured
/// per [`log_colour`]. An invalid `RUST_LOG` is reported and the default is used.
///
/// The filter is a static per-target one ([`Targets`](tracing_subscriber::filter::Targets))
/// unless `RUST_LOG` filters on spans or fields ([`log_filter_is_dynamic`]), which only
/// `EnvFilter` can do. `EnvFilter` takes two process-wide read locks for every span's creation,
/// every enter and exit, every record and every close — about a dozen per proxied request,
/// each an atomic write to a cache line every worker thread shares — to track span-based
/// directives; with none to track, that is pure cost.
pub fn init_logging(quiet: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default_filter = if quiet { "warn" } else { "info" };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .fmt_fields(PlainFields)
        .with_ansi(log_colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ));
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let mut invalid = None;
    let filter = match spec.as_deref() {
        None => Box::new(static_filter(default_filter)) as LogFilter,
        Some(s) => parse_log_filter(s).unwrap_or_else(|why| {
            invalid = Some((s.to_string(), why));
            Box::new(static_filter(default_filter))
        }),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    if let Some((spec, why)) = invalid {
        tracing::warn!(
            "RUST_LOG={spec:?} is not a valid filter ({why}): logging at {default_filter}"
        );
    }
}

type LogFilter = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// `RUST_LOG`'s filter: `EnvFilter` for span or field filters, else the static `Targets`; or
/// why it is not a valid filter.
fn parse_log_filter(spec: &str) -> Result<LogFilter, String> {
    if log_filter_is_dynamic(spec) {
        let f = tracing_subscriber::EnvFilter::try_new(spec).map_err(|e| e.to_string())?;
        return Ok(Box::new(f));
    }
    let t = static_spec(spec)?
        .parse::<tracing_subscriber::filter::Targets>()
        .map_err(|e| e.to_string())?;
    Ok(Box::new(t))
}

/// A static filter list as `Targets` should parse it, or why it is not one.
///
/// - Spaces around directives and empty directives are dropped (`info, edgepool=debug,`;
///   `Targets` would take ` edgepool` as a target name, and `EnvFilter` refused it outright).
/// - `target=` with no level means `trace`, as `EnvFilter` reads it (`Targets` would read
///   `error`).
/// - A target must start with a letter, a digit, `-`, `:` or `_`, as `EnvFilter` requires
///   (`*=debug` would otherwise be taken and match nothing).
/// - A list with no directive at all is refused.
fn static_spec(spec: &str) -> Result<String, String> {
    let mut out: Vec<String> = Vec::new();
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let first = d.chars().next().expect("not empty");
        if !(first.is_ascii_alphanumeric() || matches!(first, '-' | ':' | '_')) {
            return Err(format!(
                "directive {d:?}: a target starts with a letter, a digit, '-', ':' or '_'"
            ));
        }
        out.push(match d.strip_suffix('=') {
            Some(target) => format!("{target}=trace"),
            None => d.to_string(),
        });
    }
    if out.is_empty() {
        return Err("no directive".to_string());
    }
    Ok(out.join(","))
}

fn static_filter(level: &str) -> tracing_subscriber::filter::Targets {
    level
        .parse()
        .expect("a bare level is a valid static filter")
}

/// Whether a `RUST_LOG` filter selects by span or by field value (`target[span{field=v}]=level`,
/// `[{field}]=level`): those need `EnvFilter`. Plain `target=level` lists and bare levels do not.
pub fn log_filter_is_dynamic(spec: &str) -> bool {
    spec.contains('[')
}

/// Fields as `name=value` separated by spaces, the event's message bare — the default layout
/// without its styling (the default formatter's per-field styling cost about 2,900
/// instructions a request).
///
/// Every request opens a span whose fields are formatted as they are recorded, log line or
/// not. Written piece by piece, the span's text grew its `String` five times a request (a
/// `realloc` each, which takes the allocator's arena lock: contended across threads). So the
/// fields are formatted into a per-thread scratch buffer first and land in one write: one
/// allocation for a span's fields, one growth per later `record`.
#[derive(Clone, Copy, Default)]
pub struct PlainFields;

thread_local! {
    static FIELD_SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The scratch buffer is kept only while this small: one odd huge field does not pin memory.
const FIELD_SCRATCH_KEEP: usize = 4096;

impl PlainFields {
    /// `fields` laid out, handed to `out` in one piece.
    fn with_formatted<R: tracing_subscriber::field::RecordFields>(
        fields: R,
        out: impl FnOnce(&str) -> std::fmt::Result,
    ) -> std::fmt::Result {
        let mut out = Some(out);
        let mut fields = Some(fields);
        let done = FIELD_SCRATCH.try_with(|cell| {
            // A value whose Debug logs would find the buffer taken: it gets its own.
            let Ok(mut buf) = cell.try_borrow_mut() else {
                return None;
            };
            buf.clear();
            let r = PlainVisitor::run(&mut buf, fields.take().expect("taken once"));
            let r = r.and_then(|()| (out.take().expect("taken once"))(&buf));
            if buf.capacity() > FIELD_SCRATCH_KEEP {
                *buf = String::new();
            }
            Some(r)
        });
        match (done, fields, out) {
            (Ok(Some(r)), _, _) => r,
            (_, Some(fields), Some(out)) => {
                let mut buf = String::new();
                PlainVisitor::run(&mut buf, fields)?;
                out(&buf)
            }
            _ => unreachable!("the fields are formatted exactly once"),
        }
    }
}

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for PlainFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        Self::with_formatted(fields, |text| writer.write_str(text))
    }

    fn add_fields(
        &self,
        current: &'w mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        Self::with_formatted(fields, |text| {
            if text.is_empty() {
                return Ok(());
            }
            let s = &mut current.fields;
            s.reserve_exact(usize::from(!s.is_empty()) + text.len());
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(text);
            Ok(())
        })
    }
}

/// Writes fields as [`PlainFields`] lays them out.
struct PlainVisitor<'a> {
    buf: &'a mut String,
    seen: bool,
    result: std::fmt::Result,
}

impl PlainVisitor<'_> {
    fn run<R: tracing_subscriber::field::RecordFields>(
        buf: &mut String,
        fields: R,
    ) -> std::fmt::Result {
        let mut v = PlainVisitor {
            buf,
            seen: false,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

impl tracing::field::Visit for PlainVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if self.result.is_err() {
            return;
        }
        if self.seen {
            self.buf.push(' ');
        }
        self.seen = true;
        if field.name() != "message" {
            self.buf.push_str(field.name());
            self.buf.push('=');
        }
        self.result = write!(self.buf, "{value:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log text written through `fields` by a subscriber (no time, no colour) while spans are
    /// created, recorded and logged in, as a request does.
    fn log_with<F>(fields: F) -> String
    where
        F: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        use tracing_subscriber::layer::SubscriberExt;
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let w = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .without_time()
            .with_ansi(false)
            .fmt_fields(fields)
            .with_writer(move || WriteTo(w.clone()));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let conn = tracing::info_span!("worker", peer = %"10.0.0.1");
            let _c = conn.enter();
            let req = tracing::info_span!(
                "request",
                method = %"GET",
                target = %"a.test:8080",
                exit = tracing::field::Empty,
                addr = tracing::field::Empty,
                n = 3u64,
                s = "quoted",
            );
            let _r = req.enter();
            tracing::info!("before the route");
            req.record("exit", tracing::field::display("direct"));
            req.record("addr", tracing::field::display("127.0.0.1:8080"));
            tracing::warn!(target = %"x", error = ?"e", "after \"it\"");
            tracing::info!(k = 1, "");
            tracing::info!(flag = true);
            let long = "x".repeat(FIELD_SCRATCH_KEEP * 2);
            tracing::info!(long = %long, "a long field");
            tracing::info!(after = %"the long one", "scratch still works");
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        text
    }

    #[derive(Clone)]
    struct WriteTo(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for WriteTo {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_fields_lay_out_lines_as_the_field_function_did() {
        use tracing_subscriber::field::MakeExt;
        // The formatter PlainFields replaced: a field function, space-delimited.
        let before = tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
            if field.name() != "message" {
                w.write_str(field.name())?;
                w.write_char('=')?;
            }
            write!(w, "{value:?}")
        })
        .delimited(" ");
        let now = log_with(PlainFields);
        assert_eq!(now, log_with(before));
        assert!(
            now.contains(
                "worker{peer=10.0.0.1}:request{method=GET target=a.test:8080 n=3 s=\"quoted\" exit=direct addr=127.0.0.1:8080}: "
            ),
            "{now}"
        );
        assert_eq!(now.lines().count(), 6, "{now}");
    }

    #[test]
    fn only_span_and_field_filters_need_the_dynamic_filter() {
        for s in [
            "info",
            "warn",
            "edgepool=debug,hyper=warn",
            "edgepool::pool=trace,info",
            "off",
            "INFO,edgepool=DEBUG",
            "edgepool=3",
        ] {
            assert!(!log_filter_is_dynamic(s), "{s}");
            assert!(
                s.parse::<tracing_subscriber::filter::Targets>().is_ok(),
                "{s}"
            );
        }
        for s in [
            "edgepool[request]=debug",
            "[{target=x}]=debug",
            "info,edgepool[request{method=GET}]=trace",
        ] {
            assert!(log_filter_is_dynamic(s), "{s}");
            assert!(tracing_subscriber::EnvFilter::try_new(s).is_ok(), "{s}");
        }
        let spaced: tracing_subscriber::filter::Targets =
            static_spec(" warn, edgepool::pool=debug ,")
                .unwrap()
                .parse()
                .unwrap();
        assert!(spaced.would_enable("edgepool::pool", &tracing::Level::DEBUG));
        assert!(!spaced.would_enable("edgepool::dial", &tracing::Level::INFO));
        assert!(spaced.would_enable("hyper", &tracing::Level::WARN));
        let bare: tracing_subscriber::filter::Targets = static_spec("warn,edgepool::pool=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(bare.would_enable("edgepool::pool", &tracing::Level::TRACE));
        for bad in [",", " , ", "*=debug", "=debug"] {
            assert!(static_spec(bad).is_err(), "{bad:?}");
        }
        assert!(static_filter("info").would_enable("edgepool::pool", &tracing::Level::INFO));
        assert!(!static_filter("warn").would_enable("edgepool::pool", &tracing::Level::INFO));
    }

    #[test]
    fn the_runtime_has_the_threads_asked_for() {
        assert_eq!(runtime_with_threads(1).unwrap().metrics().num_workers(), 1);
        assert_eq!(runtime_with_threads(3).unwrap().metrics().num_workers(), 3);
    }

    #[test]
    fn colour_only_at_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        // NO_COLOR set but empty does not count (no-color.org).
        assert!(log_colour(true, Some(OsStr::new(""))));
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None));
        assert!(!log_colour(false, Some(OsStr::new(""))));
    }

    #[test]
    fn failures_read_as_edgepool_colon_reason() {
        let e = CliError::ExitArg {
            reason: crate::config::CliExitError::Node(crate::exits::ExitsError::Node {
                pool: "dc".into(),
                source: crate::exits::ExitSpecError::NoPort("http".into()),
            }),
        };
        assert_eq!(
            failure_text(&e),
            "edgepool: --exit: pool dc: the proxy URL has no port; write it, e.g. http://host:3128"
        );
        let listen = CliError::Listen {
            addr: "127.0.0.1:9180".parse().unwrap(),
            key: "listen.admin",
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        let text = listen.to_string();
        assert!(
            text.starts_with("cannot listen on 127.0.0.1:9180 (listen.admin): "),
            "{text}"
        );
        assert!(std::error::Error::source(&listen).is_some());
        assert_eq!(finish::<CliError>(Ok(())), ExitCode::SUCCESS);
        assert_eq!(finish(Err(e)), ExitCode::FAILURE);
    }
}
