//! report: the reuse-killers report — per-minute counters of why connections were opened and
//! closed, kept in an embedded redb store in the data dir so a restart keeps them, ranked over a
//! window with the handshake time each reason cost.
//!
//! # Store format
//!
//! One file, `<data_dir>/reuse.redb`, holding one table, `reuse_minutes_v1`:
//!
//! - key: the minute (`u64`, unix seconds / 60) — the bucket covers `[minute*60, minute*60+60)`;
//! - value: that minute's [`MinuteCounts`] as JSON text.
//!
//! JSON keeps the value versionable: a field added later decodes as its default in old buckets
//! (`#[serde(default)]`) and an unknown field written by a newer edgepool is ignored by an older
//! one. An incompatible change gets a new table name (`reuse_minutes_v2`) rather than a
//! migration in place. A bucket is a few hundred bytes, so the 8 days [`ReportStore::prune`] is
//! meant to keep (11,520 buckets) stay in the low megabytes.
//!
//! # Window
//!
//! [`ReportStore::query`] over a window `w` ending at `now` sums the buckets whose *start* lies in
//! `[now - w, now]`: with `now` on a minute boundary that is exactly `w / 60` whole minutes plus the
//! bucket of the minute that has just begun (usually empty or not yet recorded).
//!
//! All calls do blocking file I/O (`record` syncs to disk on commit); call them from a blocking
//! context (`tokio::task::spawn_blocking`) rather than straight from an async task.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};

/// File name of the store inside the data dir.
const FILE_NAME: &str = "reuse.redb";

/// minute (unix seconds / 60) -> JSON-serialized [`MinuteCounts`].
const MINUTES: TableDefinition<u64, &str> = TableDefinition::new("reuse_minutes_v1");

/// One minute of counts (deltas for that minute).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MinuteCounts {
    /// Upstream requests sent in the minute.
    pub requests: u64,
    /// New upstream connections opened in the minute.
    pub new_connections: u64,
    /// reason -> (count, handshake seconds paid for those connections)
    pub new_by_reason: BTreeMap<String, (u64, f64)>,
    /// reason -> connections closed for that reason.
    pub closed_by_reason: BTreeMap<String, u64>,
}

impl MinuteCounts {
    /// Adds `other` into `self` (saturating counts; non-finite or negative handshake times count
    /// as 0 so a bucket always serializes to valid JSON).
    fn merge(&mut self, other: &MinuteCounts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.new_connections = self.new_connections.saturating_add(other.new_connections);
        for (reason, &(count, seconds)) in &other.new_by_reason {
            let entry = self.new_by_reason.entry(reason.clone()).or_insert((0, 0.0));
            entry.0 = entry.0.saturating_add(count);
            entry.1 = sane_seconds(sane_seconds(entry.1) + sane_seconds(seconds));
        }
        for (reason, &count) in &other.closed_by_reason {
            let entry = self.closed_by_reason.entry(reason.clone()).or_insert(0);
            *entry = entry.saturating_add(count);
        }
    }
}

/// Handshake seconds that can be stored: finite and not negative, else 0.
fn sane_seconds(s: f64) -> f64 {
    if s.is_finite() && s > 0.0 {
        s
    } else {
        0.0
    }
}

/// Errors of the report store and window parsing. Every store error names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The data dir could not be created.
    #[error("report store {path}: cannot create the data dir: {source}")]
    CreateDir {
        /// The data dir.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store file could not be created owner-only (0600).
    #[error("report store {path}: cannot create it owner-only (0600): {source}")]
    CreateFile {
        /// The store file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process (or another `ReportStore` in this one) holds the store's lock.
    #[error(
        "report store {path}: already open by another process (another edgepool on this host \
         with the same listen.proxy port and data dir?); give each instance its own port or data_dir"
    )]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// The store file could not be opened or created.
    #[error("report store {path}: cannot open: {source}")]
    Open {
        /// The store file.
        path: PathBuf,
        /// Why.
        source: Box<redb::DatabaseError>,
    },
    /// A read or write of the store failed.
    #[error("report store {path}: {source}")]
    Store {
        /// The store file.
        path: PathBuf,
        /// Why.
        source: Box<redb::Error>,
    },
    /// A stored bucket is not valid JSON for [`MinuteCounts`].
    #[error("report store {path}: bucket of minute {minute} cannot be decoded: {source}")]
    Decode {
        /// The store file.
        path: PathBuf,
        /// The bucket's minute (unix seconds / 60).
        minute: u64,
        /// Why.
        source: serde_json::Error,
    },
    /// A bucket could not be encoded as JSON.
    #[error("report store {path}: bucket of minute {minute} cannot be encoded: {source}")]
    Encode {
        /// The store file.
        path: PathBuf,
        /// The bucket's minute (unix seconds / 60).
        minute: u64,
        /// Why.
        source: serde_json::Error,
    },
    /// A window such as `7d` could not be parsed.
    #[error("bad report window {value:?}: {reason} (examples: 7d, 24h, 90m, 2w)")]
    BadWindow {
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
}

/// The per-minute counters on disk (`<data_dir>/reuse.redb`). `Send + Sync`; share it with an
/// `Arc`. redb runs one write transaction at a time, so concurrent `record`s never lose counts.
pub struct ReportStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for ReportStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ReportStore {
    /// Opens or creates `<data_dir>/reuse.redb`. Errors name the path.
    pub fn open(data_dir: &Path) -> Result<Self, ReportError> {
        Self::open_file(data_dir, FILE_NAME)
    }

    /// The store of one instance: `<data_dir>/reuse-<instance>.redb`, so instances sharing a
    /// data dir (and so one CA) each keep their own history. A `reuse.redb` left by a version
    /// that had one store per data dir is adopted (renamed) by the first instance that starts.
    pub fn open_instance(data_dir: &Path, instance: &str) -> Result<Self, ReportError> {
        let file = format!("reuse-{instance}.redb");
        let legacy = data_dir.join(FILE_NAME);
        let mine = data_dir.join(&file);
        if legacy.exists() && !mine.exists() {
            // hard link + unlink: exactly one instance adopts it, never two.
            if std::fs::hard_link(&legacy, &mine).is_ok() {
                let _ = std::fs::remove_file(&legacy);
            }
        }
        Self::open_file(data_dir, &file)
    }

    fn open_file(data_dir: &Path, file: &str) -> Result<Self, ReportError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|source| ReportError::CreateDir {
                path: data_dir.to_owned(),
                source,
            })?;
        let path = data_dir.join(file);
        // The store lists target names: owner-only, like the CA key. Created 0600 before redb
        // opens it (redb initialises an empty file), and tightened if an older run left it 0644.
        let private = || -> std::io::Result<()> {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        };
        private().map_err(|source| ReportError::CreateFile {
            path: path.clone(),
            source,
        })?;
        let db = Database::create(&path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => ReportError::Locked { path: path.clone() },
            source => ReportError::Open {
                path: path.clone(),
                source: Box::new(source),
            },
        })?;
        let store = ReportStore { db, path };
        // Create the table now so readers never meet a missing table.
        let txn = store.db.begin_write().map_err(|e| store.store_err(e))?;
        txn.open_table(MINUTES).map_err(|e| store.store_err(e))?;
        txn.commit().map_err(|e| store.store_err(e))?;
        Ok(store)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `counts` to the bucket of `minute` (unix seconds / 60); merging if the bucket exists.
    pub fn record(&self, minute: u64, counts: &MinuteCounts) -> Result<(), ReportError> {
        let txn = self.db.begin_write().map_err(|e| self.store_err(e))?;
        {
            let mut table = txn.open_table(MINUTES).map_err(|e| self.store_err(e))?;
            let mut bucket = match table.get(minute).map_err(|e| self.store_err(e))? {
                Some(old) => self.decode(minute, old.value())?,
                None => MinuteCounts::default(),
            };
            bucket.merge(counts);
            let json = serde_json::to_string(&bucket).map_err(|source| ReportError::Encode {
                path: self.path.clone(),
                minute,
                source,
            })?;
            table
                .insert(minute, json.as_str())
                .map_err(|e| self.store_err(e))?;
        }
        txn.commit().map_err(|e| self.store_err(e))
    }

    /// Deletes buckets older than `keep` before `now_minute` (call with 8 days): every bucket whose
    /// minute is below `now_minute - keep_minutes`. Returns how many were deleted.
    pub fn prune(&self, now_minute: u64, keep_minutes: u64) -> Result<u64, ReportError> {
        let cutoff = now_minute.saturating_sub(keep_minutes);
        let txn = self.db.begin_write().map_err(|e| self.store_err(e))?;
        let mut deleted = 0u64;
        {
            let mut table = txn.open_table(MINUTES).map_err(|e| self.store_err(e))?;
            let mut old = Vec::new();
            for entry in table.range(..cutoff).map_err(|e| self.store_err(e))? {
                let (key, _) = entry.map_err(|e| self.store_err(e))?;
                old.push(key.value());
            }
            for minute in old {
                if table
                    .remove(minute)
                    .map_err(|e| self.store_err(e))?
                    .is_some()
                {
                    deleted += 1;
                }
            }
        }
        if deleted == 0 {
            txn.abort().map_err(|e| self.store_err(e))?;
        } else {
            txn.commit().map_err(|e| self.store_err(e))?;
        }
        Ok(deleted)
    }

    /// The report over the last `window` ending at `now` (unix seconds): the buckets whose start
    /// lies in `[now - window, now]`.
    pub fn query(&self, window: Duration, now: u64) -> Result<Report, ReportError> {
        let first = now.saturating_sub(window.as_secs()).div_ceil(60);
        let last = now / 60;
        let mut total = MinuteCounts::default();
        let mut newest: Option<u64> = None;
        if first <= last {
            let txn = self.db.begin_read().map_err(|e| self.store_err(e))?;
            let table = match txn.open_table(MINUTES) {
                Ok(table) => Some(table),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(self.store_err(e)),
            };
            if let Some(table) = table {
                for entry in table.range(first..=last).map_err(|e| self.store_err(e))? {
                    let (key, value) = entry.map_err(|e| self.store_err(e))?;
                    let minute = key.value();
                    total.merge(&self.decode(minute, value.value())?);
                    newest = Some(newest.map_or(minute, |n| n.max(minute)));
                }
            }
        }
        Ok(Report::from_counts(window, &total, newest))
    }

    fn decode(&self, minute: u64, json: &str) -> Result<MinuteCounts, ReportError> {
        serde_json::from_str(json).map_err(|source| ReportError::Decode {
            path: self.path.clone(),
            minute,
            source,
        })
    }

    fn store_err(&self, e: impl Into<redb::Error>) -> ReportError {
        ReportError::Store {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }
}

/// The ranked reuse killers over a window.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The window length in whole seconds.
    pub window_seconds: u64,
    /// The window, humantime (e.g. "7days", "1h").
    pub window: String,
    /// RFC 3339 UTC of the start of the newest bucket in the window (or "never").
    pub updated: String,
    /// Upstream requests in the window.
    pub sample_requests: u64,
    /// New upstream connections in the window.
    pub sample_new_connections: u64,
    /// 1 - new/requests over the window (1.0 when no requests; never below 0).
    pub reuse_rate: f64,
    /// Why connections were opened, ranked by count desc, then name.
    pub new_reasons: Vec<ReasonRow>,
    /// Why connections were closed, ranked by count desc, then name (handshake_seconds 0).
    pub close_reasons: Vec<ReasonRow>,
}

/// One ranked reason.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReasonRow {
    /// 1-based rank within its section.
    pub rank: u32,
    /// The reason name (metric label).
    pub reason: String,
    /// Connections opened (or closed) for this reason.
    pub count: u64,
    /// Fraction (0..=1) of the section total.
    pub share: f64,
    /// Handshake seconds paid for the connections opened for this reason (0 for close reasons).
    pub handshake_seconds: f64,
    /// One-line operator explanation ([`explain`]); "" for unknown reasons.
    pub explanation: String,
}

impl Report {
    fn from_counts(window: Duration, total: &MinuteCounts, newest: Option<u64>) -> Report {
        let reuse_rate = if total.requests == 0 {
            1.0
        } else {
            (1.0 - total.new_connections as f64 / total.requests as f64).clamp(0.0, 1.0)
        };
        let new_reasons = rank(
            total
                .new_by_reason
                .iter()
                .map(|(reason, &(count, seconds))| (reason.as_str(), count, seconds)),
        );
        let close_reasons = rank(
            total
                .closed_by_reason
                .iter()
                .map(|(reason, &count)| (reason.as_str(), count, 0.0)),
        );
        Report {
            window_seconds: window.as_secs(),
            window: humantime::format_duration(window).to_string(),
            updated: newest.map_or_else(|| "never".to_owned(), minute_rfc3339),
            sample_requests: total.requests,
            sample_new_connections: total.new_connections,
            reuse_rate,
            new_reasons,
            close_reasons,
        }
    }

    /// The §05-style terminal table: header lines "SAMPLE SIZE · · · N requests", "WINDOW · · · 7d
    /// trailing", "UPDATED · · · 2026-11-23T19:00:00Z", then ranked rows "01  max_requests  1,234
    /// (45.1%)  handshake 12.3 s  — explanation", then close reasons.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "// reuse killers");
        let _ = writeln!(
            out,
            "SAMPLE SIZE · · · {} requests",
            group_digits(self.sample_requests)
        );
        let _ = writeln!(
            out,
            "WINDOW · · · {} trailing",
            compact_window(self.window_seconds)
        );
        let _ = writeln!(out, "UPDATED · · · {}", self.updated);
        let _ = writeln!(
            out,
            "REUSE · · · {:.1}% ({} new connections)",
            self.reuse_rate * 100.0,
            group_digits(self.sample_new_connections)
        );
        out.push('\n');
        let _ = writeln!(
            out,
            "NEW CONNECTIONS — why they were opened ({})",
            group_digits(section_total(&self.new_reasons))
        );
        render_rows(&mut out, &self.new_reasons, true);
        out.push('\n');
        let _ = writeln!(
            out,
            "CLOSED CONNECTIONS — why they left the pool ({})",
            group_digits(section_total(&self.close_reasons))
        );
        render_rows(&mut out, &self.close_reasons, false);
        out
    }
}

fn section_total(rows: &[ReasonRow]) -> u64 {
    rows.iter().fold(0u64, |sum, r| sum.saturating_add(r.count))
}

/// Rows aligned in columns: rank, reason, count (share), [handshake], explanation.
fn render_rows(out: &mut String, rows: &[ReasonRow], handshake: bool) {
    if rows.is_empty() {
        out.push_str("    (none)\n");
        return;
    }
    let reason_w = rows.iter().map(|r| r.reason.len()).max().unwrap_or(0);
    let counts: Vec<String> = rows.iter().map(|r| group_digits(r.count)).collect();
    let count_w = counts.iter().map(String::len).max().unwrap_or(0);
    let seconds: Vec<String> = rows
        .iter()
        .map(|r| format!("{:.1}", r.handshake_seconds))
        .collect();
    let seconds_w = seconds.iter().map(String::len).max().unwrap_or(0);
    let shares: Vec<String> = rows
        .iter()
        .map(|r| format!("({:.1}%)", r.share * 100.0))
        .collect();
    let share_w = shares.iter().map(String::len).max().unwrap_or(0);
    for (((row, count), share), secs) in rows.iter().zip(&counts).zip(&shares).zip(&seconds) {
        let mut line = format!(
            "{:02}  {:<reason_w$}  {count:>count_w$} {share:<share_w$}",
            row.rank, row.reason,
        );
        if handshake {
            let _ = write!(line, "  handshake {secs:>seconds_w$} s");
        }
        if !row.explanation.is_empty() {
            let _ = write!(line, "  — {}", row.explanation);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// Ranks `(reason, count, handshake seconds)` by count desc, then name; drops zero counts.
fn rank<'a>(items: impl Iterator<Item = (&'a str, u64, f64)>) -> Vec<ReasonRow> {
    let mut items: Vec<(&str, u64, f64)> = items.filter(|&(_, count, _)| count > 0).collect();
    items.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let total = items.iter().fold(0u64, |sum, i| sum.saturating_add(i.1));
    items
        .into_iter()
        .enumerate()
        .map(|(i, (reason, count, seconds))| ReasonRow {
            rank: u32::try_from(i + 1).unwrap_or(u32::MAX),
            reason: reason.to_owned(),
            count,
            share: if total == 0 {
                0.0
            } else {
                count as f64 / total as f64
            },
            handshake_seconds: seconds,
            explanation: explain(reason).to_owned(),
        })
        .collect()
}

/// RFC 3339 UTC of the start of `minute` (falls back to the number for absurd values).
fn minute_rfc3339(minute: u64) -> String {
    minute
        .checked_mul(60)
        .and_then(|secs| i64::try_from(secs).ok())
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("minute {minute}"))
}

/// "1234567" -> "1,234,567".
fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The window in one unit, as an operator would type it: 7d, 24h is "1d", 90m, 45s.
fn compact_window(secs: u64) -> String {
    if secs > 0 && secs % 86_400 == 0 {
        format!("{}d", secs / 86_400)
    } else if secs > 0 && secs % 3_600 == 0 {
        format!("{}h", secs / 3_600)
    } else if secs > 0 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// How long per-minute counts are kept (8 days): the longest window a report can cover.
pub const RETENTION_MINUTES: u64 = 8 * 24 * 60;

/// Parses "7d", "1h", "90m" (humantime) into a Duration, at most the retention (8 days);
/// error names the bad value.
pub fn parse_window(s: &str) -> Result<Duration, ReportError> {
    let bad = |reason: String| ReportError::BadWindow {
        value: s.to_owned(),
        reason,
    };
    let window = humantime::parse_duration(s.trim()).map_err(|e| bad(e.to_string()))?;
    if window.as_secs() < 60 {
        return Err(bad("a window must be at least one minute".to_owned()));
    }
    if window.as_secs() > RETENTION_MINUTES * 60 {
        return Err(bad(format!(
            "edgepool keeps {} days of per-minute counts; a window can be at most 8d",
            RETENTION_MINUTES / (24 * 60)
        )));
    }
    Ok(window)
}

/// One-line explanation of a reason for operators (e.g. max_requests: "server-side · the target
/// closes a connection after N requests (load balancer limit)"). Unknown reasons get "".
///
/// Names shared by the new and the close sections (idle_expired, goaway, …) have one text that
/// reads right in both: it names the cause.
pub fn explain(reason: &str) -> &'static str {
    match reason {
        // New-connection reasons.
        "cold_key" => "first contact · no connection to this target yet (first request, or after a long quiet spell)",
        "all_busy" => "client-side · HTTP/1.1: every connection to the target was carrying a request; concurrency outgrew the warm pool",
        "h2_saturated" => "server-side · HTTP/2: every connection was at the server's SETTINGS_MAX_CONCURRENT_STREAMS",
        "after_error" => "network · a reused connection failed mid-request (retried on a fresh one) or broke",
        "forced_rotation" => "forces new IP · the worker asked for a new exit per request (rotate-request); every new exit needs a new TCP/TLS handshake",
        "rotation" => "forces new IP · a sticky window (exits.sticky_window) ended and traffic rotated to another exit",
        "new_session" => "isolation · a worker session started; sessions never share connections, so its first one is new",
        "session_change" => "forces new IP · a session or window moved to another exit (its exit failed, its lifetime ended, or it changed pool)",
        // Shared by both sections.
        "idle_expired" => "idle · retired for idling: pool.idle_timeout, or the target's announced (Keep-Alive: timeout=) or learned idle timeout",
        "server_closed_idle" => "server-side · the target closed an idle connection (FIN; as a new-connection reason also RST or stray bytes) before we retired it",
        "stale_at_checkout" => "server-side · the connection was found dead when taken from the pool",
        "goaway" => "server-side · the target sent HTTP/2 GOAWAY (restart, deploy or stream budget spent)",
        "max_requests" => "server-side · the target closes a connection after N requests (load balancer limit, Keep-Alive: max=, or pool.max_requests)",
        "server_close" => "server-side · the target answered Connection: close on the first response (no keep-alive at all)",
        "max_lifetime" => "client-side · pool.max_lifetime reached",
        "evicted" => "client-side · evicted to respect pool.max_total / pool.max_idle_total (pool too small for the concurrency)",
        // Close-only reasons.
        "keepalive_timeout" => "server-side · retired just before the target's Keep-Alive: timeout= (or learned idle timeout), minus pool.keepalive_margin",
        "reset_idle" => "network · the target or a middlebox reset (RST) an idle connection",
        "stray_bytes" => "server-side · the target wrote unrequested bytes on an idle connection, which cannot be reused safely",
        "error" => "network · the connection broke with an error during a request",
        "scope_ended" => "policy · its worker session, sticky window or forced-rotation request ended; nothing else may use it (isolation)",
        "abandoned" => "client-side · a worker went away mid-response and the rest could not be drained within limits",
        "shutdown" => "edgepool · the pool shut down",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, new: &[(&str, u64, f64)], closed: &[(&str, u64)]) -> MinuteCounts {
        MinuteCounts {
            requests,
            new_connections: new.iter().map(|n| n.1).sum(),
            new_by_reason: new
                .iter()
                .map(|&(r, c, s)| (r.to_owned(), (c, s)))
                .collect(),
            closed_by_reason: closed.iter().map(|&(r, c)| (r.to_owned(), c)).collect(),
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);
    // 2026-11-23T19:00:00Z
    const NOW: u64 = 1_795_460_400;

    fn row<'a>(rows: &'a [ReasonRow], reason: &str) -> &'a ReasonRow {
        rows.iter().find(|r| r.reason == reason).unwrap()
    }

    #[test]
    fn record_and_query_sum_and_rank() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReportStore::open(dir.path()).unwrap();
        assert_eq!(store.path(), dir.path().join("reuse.redb"));
        let m = NOW / 60;
        store
            .record(
                m - 2,
                &counts(
                    100,
                    &[("max_requests", 3, 0.3), ("cold_key", 1, 0.2)],
                    &[("idle_expired", 2)],
                ),
            )
            .unwrap();
        store
            .record(
                m - 1,
                &counts(
                    100,
                    &[("max_requests", 2, 0.2), ("all_busy", 1, 0.1)],
                    &[("max_requests", 5), ("idle_expired", 1)],
                ),
            )
            .unwrap();
        let r = store.query(7 * DAY, NOW).unwrap();
        assert_eq!(r.sample_requests, 200);
        assert_eq!(r.sample_new_connections, 7);
        assert!((r.reuse_rate - (1.0 - 7.0 / 200.0)).abs() < 1e-12);
        assert_eq!(r.window_seconds, 7 * 86_400);
        assert_eq!(r.window, "7days");
        assert_eq!(r.updated, "2026-11-23T18:59:00Z");

        let names: Vec<&str> = r.new_reasons.iter().map(|x| x.reason.as_str()).collect();
        // count desc, then name: all_busy and cold_key tie at 1.
        assert_eq!(names, ["max_requests", "all_busy", "cold_key"]);
        let ranks: Vec<u32> = r.new_reasons.iter().map(|x| x.rank).collect();
        assert_eq!(ranks, [1, 2, 3]);
        let mr = row(&r.new_reasons, "max_requests");
        assert_eq!(mr.count, 5);
        assert!((mr.share - 5.0 / 7.0).abs() < 1e-12);
        assert!((mr.handshake_seconds - 0.5).abs() < 1e-12);
        assert_eq!(mr.explanation, explain("max_requests"));

        let close: Vec<(&str, u64)> = r
            .close_reasons
            .iter()
            .map(|x| (x.reason.as_str(), x.count))
            .collect();
        assert_eq!(close, [("max_requests", 5), ("idle_expired", 3)]);
        assert!(r.close_reasons.iter().all(|x| x.handshake_seconds == 0.0));
        assert!((r.close_reasons[1].share - 3.0 / 8.0).abs() < 1e-12);

        // JSON round trip (what /report serves and `edgepool report` reads).
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), r);
    }

    #[test]
    fn records_into_the_same_minute_merge() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReportStore::open(dir.path()).unwrap();
        let m = NOW / 60 - 1;
        store
            .record(
                m,
                &counts(10, &[("goaway", 1, 0.25)], &[("goaway", 1), ("error", 2)]),
            )
            .unwrap();
        store
            .record(
                m,
                &counts(
                    5,
                    &[("goaway", 2, 0.5), ("cold_key", 1, 1.0)],
                    &[("goaway", 3)],
                ),
            )
            .unwrap();
        let r = store.query(Duration::from_secs(3600), NOW).unwrap();
        assert_eq!(r.sample_requests, 15);
        assert_eq!(r.sample_new_connections, 4);
        let g = row(&r.new_reasons, "goaway");
        assert_eq!((g.rank, g.count), (1, 3));
        assert!((g.handshake_seconds - 0.75).abs() < 1e-12);
        assert_eq!(row(&r.close_reasons, "goaway").count, 4);
        assert_eq!(row(&r.close_reasons, "error").count, 2);
    }

    #[test]
    fn window_excludes_older_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReportStore::open(dir.path()).unwrap();
        let m = NOW / 60;
        store
            .record(m - 61, &counts(1000, &[("cold_key", 100, 1.0)], &[]))
            .unwrap();
        store
            .record(m - 60, &counts(10, &[("evicted", 1, 0.1)], &[]))
            .unwrap();
        store
            .record(m - 1, &counts(10, &[("all_busy", 2, 0.1)], &[]))
            .unwrap();
        // A bucket after `now` (clock skew) is not in the window either.
        store
            .record(m + 5, &counts(7, &[("goaway", 7, 0.1)], &[]))
            .unwrap();
        let r = store.query(parse_window("1h").unwrap(), NOW).unwrap();
        assert_eq!(r.window, "1h");
        assert_eq!(r.sample_requests, 20);
        let names: Vec<&str> = r.new_reasons.iter().map(|x| x.reason.as_str()).collect();
        assert_eq!(names, ["all_busy", "evicted"]);
        let r = store.query(parse_window("2h").unwrap(), NOW).unwrap();
        assert_eq!(r.sample_requests, 1020);
        assert_eq!(r.new_reasons[0].reason, "cold_key");
    }

    #[test]
    fn reopening_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let m = NOW / 60 - 3;
        {
            let store = ReportStore::open(dir.path()).unwrap();
            store
                .record(
                    m,
                    &counts(50, &[("server_close", 5, 2.5)], &[("shutdown", 4)]),
                )
                .unwrap();
        }
        let store = ReportStore::open(dir.path()).unwrap();
        store
            .record(m, &counts(50, &[("server_close", 1, 0.5)], &[]))
            .unwrap();
        let r = store.query(DAY, NOW).unwrap();
        assert_eq!(r.sample_requests, 100);
        assert_eq!(r.new_reasons[0].count, 6);
        assert!((r.new_reasons[0].handshake_seconds - 3.0).abs() < 1e-12);
        assert_eq!(r.close_reasons[0].reason, "shutdown");
    }

    #[test]
    fn second_open_while_held_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let _store = ReportStore::open(dir.path()).unwrap();
        let err = ReportStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, ReportError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("reuse.redb"), "{err}");
    }

    #[test]
    fn open_creates_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        ReportStore::open(&nested).unwrap();
        assert!(nested.join("reuse.redb").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(nested.join("reuse.redb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the store lists target names: owner-only"
        );
    }

    #[test]
    fn prune_deletes_old_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReportStore::open(dir.path()).unwrap();
        let now_minute = NOW / 60;
        let keep = 8 * 24 * 60;
        for m in [
            now_minute - keep - 100,
            now_minute - keep - 1,
            now_minute - keep,
            now_minute - 1,
        ] {
            store.record(m, &counts(1, &[], &[])).unwrap();
        }
        assert_eq!(store.prune(now_minute, keep).unwrap(), 2);
        assert_eq!(store.prune(now_minute, keep).unwrap(), 0);
        let r = store.query(Duration::from_secs(30 * 86_400), NOW).unwrap();
        assert_eq!(r.sample_requests, 2);
        // Far-past `now` does not underflow.
        assert_eq!(store.prune(5, keep).unwrap(), 0);
    }

    #[test]
    fn parse_window_good_and_bad() {
        assert_eq!(parse_window("7d").unwrap(), 7 * DAY);
        assert_eq!(parse_window("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_window("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_window("8d").unwrap(), 8 * DAY);
        assert_eq!(parse_window(" 1h 30m ").unwrap(), Duration::from_secs(5400));
        // Beyond the retention: the report would silently cover only 8 days.
        let e = parse_window("2w").unwrap_err().to_string();
        assert!(e.contains("at most 8d"), "{e}");
        for bad in ["", "7x", "seven days", "-1h", "30s", "0m", "8d 1m", "30d"] {
            let err = parse_window(bad).unwrap_err();
            assert!(matches!(err, ReportError::BadWindow { .. }), "{bad:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn render_table_has_headers_and_ranks_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReportStore::open(dir.path()).unwrap();
        store
            .record(
                NOW / 60,
                &counts(
                    1_234_567,
                    &[
                        ("max_requests", 1234, 12.34),
                        ("cold_key", 500, 4.0),
                        ("mystery", 2, 0.0),
                    ],
                    &[("idle_expired", 900), ("evicted", 12)],
                ),
            )
            .unwrap();
        let r = store.query(7 * DAY, NOW).unwrap();
        let t = r.render_table();
        assert!(t.contains("SAMPLE SIZE · · · 1,234,567 requests"), "{t}");
        assert!(t.contains("WINDOW · · · 7d trailing"), "{t}");
        assert!(t.contains("UPDATED · · · 2026-11-23T19:00:00Z"), "{t}");
        let mr = t.find("01  max_requests").expect(&t);
        let ck = t.find("02  cold_key").expect(&t);
        let my = t.find("03  mystery").expect(&t);
        let closed = t.find("CLOSED CONNECTIONS").expect(&t);
        let ie = t.find("01  idle_expired").expect(&t);
        let ev = t.find("02  evicted").expect(&t);
        assert!(
            mr < ck && ck < my && my < closed && closed < ie && ie < ev,
            "{t}"
        );
        assert!(
            t.contains("1,234 (71.1%)  handshake 12.3 s  — server-side · "),
            "{t}"
        );
        // Unknown reasons render without an explanation.
        let mystery_line = t.lines().find(|l| l.contains("mystery")).unwrap();
        assert!(!mystery_line.contains('—'), "{mystery_line}");
    }

    #[test]
    fn empty_store_reports_full_reuse_and_never() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReportStore::open(dir.path()).unwrap();
        let r = store.query(7 * DAY, NOW).unwrap();
        assert_eq!(r.reuse_rate, 1.0);
        assert_eq!(r.updated, "never");
        assert_eq!(r.sample_requests, 0);
        assert!(r.new_reasons.is_empty() && r.close_reasons.is_empty());
        let t = r.render_table();
        assert!(t.contains("UPDATED · · · never"), "{t}");
        assert!(t.contains("(none)"), "{t}");
    }

    #[test]
    fn bad_handshake_times_are_stored_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReportStore::open(dir.path()).unwrap();
        let m = NOW / 60;
        store
            .record(m, &counts(3, &[("cold_key", 1, f64::NAN)], &[]))
            .unwrap();
        store
            .record(m, &counts(3, &[("cold_key", 1, f64::INFINITY)], &[]))
            .unwrap();
        store
            .record(m, &counts(3, &[("cold_key", 1, 0.5)], &[]))
            .unwrap();
        let r = store.query(DAY, NOW).unwrap();
        assert_eq!(r.new_reasons[0].count, 3);
        assert_eq!(r.new_reasons[0].handshake_seconds, 0.5);
    }

    #[test]
    fn every_known_reason_is_explained() {
        for reason in [
            "cold_key",
            "all_busy",
            "h2_saturated",
            "idle_expired",
            "server_closed_idle",
            "stale_at_checkout",
            "goaway",
            "max_requests",
            "server_close",
            "max_lifetime",
            "evicted",
            "after_error",
            "keepalive_timeout",
            "reset_idle",
            "stray_bytes",
            "error",
            "abandoned",
            "shutdown",
            "forced_rotation",
            "session_change",
        ] {
            assert!(!explain(reason).is_empty(), "{reason}");
        }
        // And whatever the pool can emit.
        for reason in crate::pool::NewReason::ALL {
            assert!(!explain(reason.as_str()).is_empty(), "{reason:?}");
        }
        for reason in crate::pool::CloseReason::ALL {
            assert!(!explain(reason.as_str()).is_empty(), "{reason:?}");
        }
        assert_eq!(explain("no_such_reason"), "");
    }

    #[test]
    fn helpers() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1_234_567), "1,234,567");
        assert_eq!(compact_window(7 * 86_400), "7d");
        assert_eq!(compact_window(3_600), "1h");
        assert_eq!(compact_window(5_400), "90m");
        assert_eq!(compact_window(61), "61s");
        assert_eq!(minute_rfc3339(NOW / 60), "2026-11-23T19:00:00Z");
    }
}
