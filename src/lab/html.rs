//! lab::html: the reuse lab's report as one self-contained HTML page (`edgepool lab --html FILE`).
//!
//! [`render`] takes the JSON document `edgepool lab --json` writes and returns a complete page:
//! inline CSS, charts drawn here as inline SVG, no scripts, no fonts, no external assets — the
//! file works offline, scales with the window (every chart has a `viewBox`) and prints.
//!
//! The page, top to bottom:
//! - the header: scenario, description, quick/full, seed, date, machine, edgepool version,
//!   workers × requests and the injected delays;
//! - the summary table, one row per mode (best value per column in bold, non-zero errors
//!   highlighted), followed by the greedy reference's explanation;
//! - chart 1: latency CDF per mode (log x axis when the latencies span more than 20×);
//! - chart 2: R per target, grouped bars per mode with the greedy reference's R as a black marker, and the
//!   same numbers as a table (tooltips do not print);
//! - chart 3: new connections by reason per mode, horizontal stacked bars, one fixed colour per
//!   reason, with each reason's explanation;
//! - the targets the origins played.
//!
//! Every string taken from the report is HTML-escaped before it reaches the page, and none is
//! ever placed in an attribute. The renderer is tolerant: a missing or mistyped field renders as
//! "—", an empty report renders an (almost) empty page, nothing panics.

use std::fmt::Write as _;

use serde_json::Value;

/// What a missing value renders as.
const DASH: &str = "—";

/// Width of every chart's `viewBox` (the SVG scales to the page width).
const CHART_W: f64 = 860.0;

/// Approximate advance of one character of 12px chart text, for layout.
const CHAR_W: f64 = 6.8;

/// Colours (and line dashes, for prints without colour) for modes the lab does not name.
const OTHER_MODES: [(&str, &str); 5] = [
    ("#bc4c00", "4 2"),
    ("#0a7d8c", "1 3"),
    ("#bf3989", "6 2 1 2"),
    ("#57606a", "10 3"),
    ("#7d4e00", "3 3"),
];

/// One fixed colour per new-connection reason, in the pool's stable reason order.
const REASONS: [(&str, &str); 16] = [
    ("cold_key", "#8c959f"),
    ("all_busy", "#0969da"),
    ("h2_saturated", "#54aeff"),
    ("idle_expired", "#d4a72c"),
    ("server_closed_idle", "#9a6700"),
    ("stale_at_checkout", "#fb8f44"),
    ("goaway", "#8250df"),
    ("max_requests", "#cf222e"),
    ("server_close", "#82071e"),
    ("max_lifetime", "#bf3989"),
    ("evicted", "#424a53"),
    ("after_error", "#1b1f24"),
    ("rotation", "#1a7f37"),
    ("forced_rotation", "#4ac26b"),
    ("new_session", "#0a7d8c"),
    ("session_change", "#6cc5d2"),
];

/// Colours for reasons not in [`REASONS`] (assigned in name order).
const OTHER_REASONS: [&str; 6] = [
    "#a475f9", "#e16f24", "#2da44e", "#ff80c8", "#7d4e00", "#3192aa",
];

/// The page's style sheet.
const STYLE: &str = r#"<style>
:root {
  --bg: #f6f7f9; --card: #fff; --ink: #1f2328; --muted: #57606a; --faint: #8c959f;
  --line: #d0d7de; --grid: #eaeef2; --bad: #a40e26; --bad-bg: #ffebe9;
  --sans: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Arial, sans-serif;
  --mono: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace;
}
* { box-sizing: border-box; }
html, body { margin: 0; background: var(--bg); color: var(--ink); font: 14px/1.45 var(--sans); }
main { max-width: 1180px; margin: 0 auto; padding: 16px; display: flex; flex-direction: column; gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; min-width: 0; }
h1 { font-size: 20px; margin: 0 0 4px; }
h1 .scenario { font-family: var(--mono); font-weight: 600; }
h2 { font-size: 15px; margin: 0 0 8px; }
.desc, .prose { white-space: pre-wrap; overflow-wrap: anywhere; margin: 4px 0 10px; }
dl.meta { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 6px 18px; margin: 0; }
dl.meta div { min-width: 0; }
dl.meta dt { color: var(--muted); font-size: 12px; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--grid); text-align: left; white-space: nowrap; }
thead th { font-size: 12px; color: var(--muted); font-weight: 600; border-bottom: 1px solid var(--line); vertical-align: bottom; white-space: normal; }
th.num, td.num { text-align: right; }
td.best { font-weight: 700; }
td.bad { color: var(--bad); background: var(--bad-bg); font-weight: 700; }
td .sub, .muted { color: var(--muted); font-size: 12px; }
svg.sw { width: 10px; height: 10px; margin-right: 6px; vertical-align: -1px; }
figure { margin: 0; overflow-x: auto; }
figcaption, .note { color: var(--muted); font-size: 12px; margin-top: 6px; }
svg.chart { display: block; width: 100%; min-width: 560px; height: auto; }
svg.chart text { font-family: var(--sans); font-size: 12px; fill: var(--ink); }
svg.chart text.tick { font-size: 11px; fill: var(--muted); }
svg.chart text.none { font-style: italic; fill: var(--muted); }
svg.chart .grid { stroke: var(--grid); stroke-width: 1; }
svg.chart .axis { stroke: var(--faint); stroke-width: 1; }
p.empty { color: var(--muted); font-style: italic; }
ul.reasons { margin: 6px 0 0; padding-left: 18px; font-size: 12px; color: var(--muted); }
ul.reasons b { color: var(--ink); font-family: var(--mono); font-weight: 600; }
footer { color: var(--faint); font-size: 12px; text-align: center; }
@media (max-width: 640px) { main { padding: 8px; } th, td { padding: 3px 5px; } }
@media print {
  html, body { background: #fff; font-size: 11px; }
  main { max-width: none; padding: 0; }
  .card { border: none; padding: 0; }
  .chart-card { break-inside: avoid; page-break-inside: avoid; }
  .scroll, figure { overflow: visible; }
  svg.chart { min-width: 0; }
  td.bad, svg { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
}
@page { margin: 14mm; }
</style>
"#;

/// Renders the lab report (the JSON document `edgepool lab --json` writes) as a self-contained
/// HTML page.
///
/// Missing or mistyped fields render as "—"; any JSON value (even `null`) yields a valid page.
pub fn render(report: &Value) -> String {
    let modes = modes(report);
    let mut out = String::with_capacity(64 * 1024);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(
        out,
        "<title>edgepool lab — {}</title>",
        esc_or_dash(text(report.get("scenario")).as_deref())
    );
    out.push_str(STYLE);
    out.push_str("</head>\n<body>\n<main>\n");
    header(&mut out, report);
    summary(&mut out, report, &modes);
    chart_latency(&mut out, &modes);
    chart_reuse(&mut out, report, &modes);
    chart_reasons(&mut out, &modes);
    targets(&mut out, report);
    let _ = writeln!(
        out,
        "<footer>edgepool {} · reuse lab report · self-contained page, no external assets</footer>",
        esc_or_dash(text(report.get("edgepool_version")).as_deref())
    );
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Reading the report.

/// One mode of the report with its chart style.
struct Mode<'a> {
    /// The mode's name (raw, escape before use).
    name: String,
    /// The mode's JSON object.
    v: &'a Value,
    /// Line / bar colour.
    color: &'static str,
    /// Line dash pattern ("" = solid).
    dash: &'static str,
}

/// The report's modes, each with a fixed style for the lab's own mode names.
fn modes(report: &Value) -> Vec<Mode<'_>> {
    let Some(list) = report.get("modes").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut other = 0;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let name = text(v.get("mode")).unwrap_or_else(|| format!("mode {}", i + 1));
            let (color, dash) = match name.as_str() {
                "edgepool" => ("#0550ae", ""),
                "no-keepalive" => ("#cf222e", "7 4"),
                "per-worker" => ("#1a7f37", "2 3"),
                "external" => ("#8250df", "9 3 2 3"),
                _ => {
                    let style = OTHER_MODES[other % OTHER_MODES.len()];
                    other += 1;
                    style
                }
            };
            Mode {
                name,
                v,
                color,
                dash,
            }
        })
        .collect()
}

/// A scalar as display text (unescaped): strings as is, numbers as JSON prints them, booleans as
/// yes/no. `None` for missing, null, empty strings, arrays and objects.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "yes" } else { "no" }.to_owned()),
        _ => None,
    }
}

/// A finite number field of an object.
fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key)?.as_f64().filter(|x| x.is_finite())
}

/// A finite number field of a nested object (`v[outer][key]`).
fn num_in(v: &Value, outer: &str, key: &str) -> Option<f64> {
    num(v.get(outer)?, key)
}

// ---------------------------------------------------------------------------------------------
// Text and number formatting.

/// HTML-escapes text for element content and attribute values; drops control characters other
/// than tab and newlines.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            '\t' | '\n' | '\r' => o.push(c),
            c if c.is_control() => {}
            c => o.push(c),
        }
    }
    o
}

/// Escaped text, or "—" when missing.
fn esc_or_dash(s: Option<&str>) -> String {
    s.map_or_else(|| DASH.to_owned(), esc)
}

/// At most `n` characters of `s`, with "…" when cut (unescaped).
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Approximate width of a chart label.
fn text_w(s: &str) -> f64 {
    s.chars().count() as f64 * CHAR_W
}

/// `x` with `d` decimals, never "-0".
fn fixed(x: f64, d: usize) -> String {
    let s = format!("{x:.d$}");
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_owned(),
        _ => s,
    }
}

/// A count: whole numbers without decimals, anything else with one.
fn count(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        fixed(x, 0)
    } else {
        fixed(x, 1)
    }
}

/// An axis tick label: enough decimals for small values, "k" for large ones.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 10_000.0 {
        let s = fixed(v / 1000.0, 1);
        format!("{}k", s.strip_suffix(".0").unwrap_or(&s))
    } else if a >= 1.0 {
        let s = fixed(v, 1);
        s.strip_suffix(".0").unwrap_or(&s).to_owned()
    } else {
        let d = ((-a.log10()).floor() as usize + 1).min(6);
        let s = fixed(v, d + 1);
        let s = s.trim_end_matches('0');
        s.strip_suffix('.').unwrap_or(s).to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Scales and ticks.

/// A "nice" number near `x` (1, 2 or 5 × 10^k): rounded when `round`, else the ceiling.
fn nice_num(x: f64, round: bool) -> f64 {
    if x.is_nan() || x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    let f = x / p;
    let nf = if round {
        match f {
            f if f < 1.5 => 1.0,
            f if f < 3.0 => 2.0,
            f if f < 7.0 => 5.0,
            _ => 10.0,
        }
    } else {
        match f {
            f if f <= 1.0 => 1.0,
            f if f <= 2.0 => 2.0,
            f if f <= 5.0 => 5.0,
            _ => 10.0,
        }
    };
    nf * p
}

/// A linear domain covering `[lo, hi]` on nice bounds, with about `n` ticks.
fn nice_ticks(lo: f64, hi: f64, n: usize) -> (f64, f64, Vec<f64>) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo, lo + lo.abs().max(1.0))
    };
    let step = nice_num(nice_num(hi - lo, false) / (n.max(2) - 1) as f64, true);
    let nlo = (lo / step).floor() * step;
    let nhi = (hi / step).ceil() * step;
    let mut ticks = Vec::new();
    for i in 0..=100 {
        let t = nlo + i as f64 * step;
        if t > nhi + step * 1e-6 {
            break;
        }
        // Snap float noise (0.30000000000000004) so labels stay short.
        ticks.push((t / step).round() * step);
    }
    if nhi > nlo {
        (nlo, nhi, ticks)
    } else {
        (lo, hi, vec![lo, hi])
    }
}

/// The largest 1/2/5 × 10^k not above `v` (`down`) or the smallest not below it.
fn snap125(v: f64, down: bool) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    let m = v / p;
    let steps = [1.0, 2.0, 5.0, 10.0];
    let pick = if down {
        steps
            .iter()
            .rev()
            .find(|&&s| s <= m * (1.0 + 1e-9))
            .copied()
    } else {
        steps.iter().find(|&&s| s >= m * (1.0 - 1e-9)).copied()
    };
    pick.unwrap_or(1.0) * p
}

/// A log domain covering `[lo, hi]` (both > 0) on 1/2/5 bounds, with 1/2/5 ticks (decades only
/// when there would be too many).
fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let (lo, hi) = (snap125(lo, true), snap125(hi, false));
    let (e0, e1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let within = |t: f64| t >= lo * (1.0 - 1e-9) && t <= hi * (1.0 + 1e-9);
    let mut ticks: Vec<f64> = (e0..=e1)
        .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
        .filter(|&t| within(t))
        .collect();
    if ticks.len() > 12 {
        let decades: Vec<f64> = (e0..=e1)
            .map(|e| 10f64.powi(e))
            .filter(|&t| within(t))
            .collect();
        let every = decades.len().div_ceil(10).max(1);
        ticks = decades.into_iter().step_by(every).collect();
    }
    (lo, hi, ticks)
}

/// Maps data values onto a pixel range.
struct Scale {
    /// Domain start.
    lo: f64,
    /// Domain end.
    hi: f64,
    /// Logarithmic (domain > 0) rather than linear.
    log: bool,
    /// Pixel of `lo`.
    a: f64,
    /// Pixel of `hi`.
    b: f64,
}

impl Scale {
    /// The pixel of `v`, clamped to the range.
    fn px(&self, v: f64) -> f64 {
        let f = if self.log {
            let l = |x: f64| x.max(self.lo).log10();
            (l(v) - l(self.lo)) / (l(self.hi) - l(self.lo))
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        let f = if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.a + f * (self.b - self.a)
    }
}

// ---------------------------------------------------------------------------------------------
// SVG pieces.

/// How a legend entry is drawn.
enum Key {
    /// A line in a colour and dash pattern.
    Line(&'static str, &'static str),
    /// A filled square.
    Fill(&'static str),
    /// The reference marker (short thick dark line).
    Mark,
}

/// A legend laid out in wrapping rows from `(x0, y0)`; returns the SVG and its height.
fn legend(items: &[(String, Key)], x0: f64, y0: f64, max_w: f64) -> (String, f64) {
    const ROW: f64 = 18.0;
    let mut s = String::new();
    let (mut x, mut y) = (x0, y0);
    for (label, key) in items {
        let label = clip(label, 36);
        let sw = match key {
            Key::Fill(_) => 12.0,
            Key::Line(..) | Key::Mark => 24.0,
        };
        let w = sw + 6.0 + text_w(&label) + 18.0;
        if x > x0 && x + w > x0 + max_w {
            x = x0;
            y += ROW;
        }
        let cy = y + ROW / 2.0;
        match key {
            Key::Line(color, dash) => {
                let _ = write!(
                    s,
                    "<line x1=\"{:.1}\" y1=\"{cy:.1}\" x2=\"{:.1}\" y2=\"{cy:.1}\" stroke=\"{color}\" stroke-width=\"2.5\"{}/>",
                    x,
                    x + sw,
                    dash_attr(dash)
                );
            }
            Key::Fill(color) => {
                let _ = write!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" rx=\"2\" fill=\"{color}\"/>",
                    cy - 6.0
                );
            }
            Key::Mark => {
                let _ = write!(
                    s,
                    "<line x1=\"{:.1}\" y1=\"{cy:.1}\" x2=\"{:.1}\" y2=\"{cy:.1}\" stroke=\"#1f2328\" stroke-width=\"3\"/>",
                    x + 4.0,
                    x + sw - 4.0
                );
            }
        }
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            x + sw + 6.0,
            cy + 4.0,
            esc(&label)
        );
        x += w;
    }
    (s, y - y0 + ROW)
}

/// ` stroke-dasharray="…"` for a non-solid dash pattern.
fn dash_attr(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(" stroke-dasharray=\"{dash}\"")
    }
}

/// Wraps a chart body into an `<svg>` with a `viewBox`; `label` is a fixed description.
fn svg(out: &mut String, w: f64, h: f64, label: &str, body: &str) {
    let _ = writeln!(
        out,
        "<svg class=\"chart\" viewBox=\"0 0 {w:.0} {h:.0}\" role=\"img\" aria-label=\"{}\" preserveAspectRatio=\"xMidYMid meet\"><title>{}</title>{body}</svg>",
        esc(label),
        esc(label)
    );
}

/// A horizontal grid line with its label left of the plot.
fn y_tick(s: &mut String, y: f64, x0: f64, x1: f64, label: &str) {
    let _ = write!(
        s,
        "<line class=\"grid\" x1=\"{x0:.1}\" y1=\"{y:.1}\" x2=\"{x1:.1}\" y2=\"{y:.1}\"/><text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
        x0 - 6.0,
        y + 4.0,
        esc(label)
    );
}

/// A vertical grid line with its label under the plot.
fn x_tick(s: &mut String, x: f64, y0: f64, y1: f64, label: &str) {
    let _ = write!(
        s,
        "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{y0:.1}\" x2=\"{x:.1}\" y2=\"{y1:.1}\"/><text class=\"tick\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        y1 + 15.0,
        esc(label)
    );
}

/// The left and bottom axis lines of a plot area.
fn axes(s: &mut String, x0: f64, y0: f64, x1: f64, y1: f64) {
    let _ = write!(
        s,
        "<line class=\"axis\" x1=\"{x0:.1}\" y1=\"{y0:.1}\" x2=\"{x0:.1}\" y2=\"{y1:.1}\"/><line class=\"axis\" x1=\"{x0:.1}\" y1=\"{y1:.1}\" x2=\"{x1:.1}\" y2=\"{y1:.1}\"/>"
    );
}

/// An axis title: centred under the plot, or rotated left of it.
fn axis_title(s: &mut String, x: f64, y: f64, vertical: bool, label: &str) {
    if vertical {
        let _ = write!(
            s,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 {x:.1} {y:.1})\">{}</text>",
            esc(label)
        );
    } else {
        let _ = write!(
            s,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\">{}</text>",
            esc(label)
        );
    }
}

/// A mode's colour swatch for tables.
fn swatch(color: &str) -> String {
    format!("<svg class=\"sw\" viewBox=\"0 0 10 10\" aria-hidden=\"true\"><rect width=\"10\" height=\"10\" rx=\"2\" fill=\"{color}\"/></svg>")
}

/// Dark or light text for a label on a `#rrggbb` fill.
fn ink_on(fill: &str) -> &'static str {
    let channel = |i: usize| {
        fill.get(i..i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .map_or(0.0, |v| f64::from(v) / 255.0)
    };
    let luma = 0.299 * channel(1) + 0.587 * channel(3) + 0.114 * channel(5);
    if luma > 0.6 {
        "#1f2328"
    } else {
        "#ffffff"
    }
}

// ---------------------------------------------------------------------------------------------
// Sections.

/// Header: scenario, description and run parameters.
fn header(out: &mut String, r: &Value) {
    out.push_str("<header class=\"card\">\n");
    let _ = writeln!(
        out,
        "<h1>edgepool reuse lab · <span class=\"scenario\">{}</span></h1>",
        esc_or_dash(text(r.get("scenario")).as_deref())
    );
    let _ = writeln!(
        out,
        "<p class=\"desc\">{}</p>",
        esc_or_dash(text(r.get("description")).as_deref())
    );
    let run = match r.get("quick").and_then(Value::as_bool) {
        Some(true) => "quick".to_owned(),
        Some(false) => "full".to_owned(),
        None => DASH.to_owned(),
    };
    let workers = num(r, "workers");
    let per = num(r, "requests_per_worker");
    let fleet = match (workers, per) {
        (None, None) => DASH.to_owned(),
        (w, p) => {
            let total = w
                .zip(p)
                .map(|(w, p)| format!(" = {} requests", count(w * p)))
                .unwrap_or_default();
            format!(
                "{} workers × {} requests{total}",
                w.map_or_else(|| DASH.to_owned(), count),
                p.map_or_else(|| DASH.to_owned(), count)
            )
        }
    };
    let items = [
        ("Run", esc(&run)),
        ("Seed", esc_or_dash(text(r.get("seed")).as_deref())),
        ("Started", esc_or_dash(text(r.get("started")).as_deref())),
        ("Machine", esc_or_dash(text(r.get("machine")).as_deref())),
        (
            "edgepool version",
            esc_or_dash(text(r.get("edgepool_version")).as_deref()),
        ),
        ("Fleet", esc(&fleet)),
        ("Injected delays", delays(r.get("delays_ms"))),
    ];
    out.push_str("<dl class=\"meta\">\n");
    for (k, v) in items {
        let _ = writeln!(out, "<div><dt>{k}</dt><dd>{v}</dd></div>");
    }
    out.push_str("</dl>\n</header>\n");
}

/// The injected delays as escaped text: "TCP connect 42 ms · TLS handshake 85 ms · TTFB 108 ms".
fn delays(v: Option<&Value>) -> String {
    let Some(Value::Object(map)) = v else {
        return DASH.to_owned();
    };
    if map.is_empty() {
        return "none".to_owned();
    }
    const KNOWN: [(&str, &str); 3] = [
        ("tcp_connect", "TCP connect"),
        ("tls_handshake", "TLS handshake"),
        ("ttfb", "TTFB"),
    ];
    let one = |key: &str, label: &str| {
        let value = map
            .get(key)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite())
            .map_or_else(|| DASH.to_owned(), |x| format!("{} ms", count(x)));
        format!("{} {value}", esc(label))
    };
    let mut parts: Vec<String> = KNOWN
        .iter()
        .filter(|(k, _)| map.contains_key(*k))
        .map(|(k, label)| one(k, label))
        .collect();
    for key in map.keys() {
        if !KNOWN.iter().any(|(k, _)| k == key) {
            parts.push(one(key, &key.replace('_', " ")));
        }
    }
    parts.join(" · ")
}

/// Which way a summary column improves.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    /// Larger is better.
    Higher,
    /// Smaller is better.
    Lower,
    /// No best value (shown for reference).
    Neither,
}

/// One column of the summary table.
struct Col {
    /// Header text.
    head: &'static str,
    /// Header tooltip.
    help: &'static str,
    /// Which way is better.
    better: Better,
    /// The value of a mode.
    get: fn(&Value) -> Option<f64>,
    /// How the value prints.
    fmt: fn(f64) -> String,
}

/// The summary table's columns.
fn columns() -> [Col; 13] {
    [
        Col {
            head: "Requests",
            help: "requests the fleet sent",
            better: Better::Neither,
            get: |m| num(m, "requests"),
            fmt: count,
        },
        Col {
            head: "Errors",
            help: "requests that failed",
            better: Better::Lower,
            get: |m| num(m, "errors"),
            fmt: count,
        },
        Col {
            head: "R at origins",
            help: "reuse rate measured at the origins: 1 − connections / requests",
            better: Better::Higher,
            get: |m| num(m, "reuse_rate"),
            fmt: |x| fixed(x, 3),
        },
        Col {
            head: "Reference R",
            help: "the best reuse rate possible for this request sequence",
            better: Better::Neither,
            get: |m| num(m, "reference_reuse_rate"),
            fmt: |x| fixed(x, 3),
        },
        Col {
            head: "R / reference",
            help: "share of the possible reuse achieved",
            better: Better::Higher,
            get: |m| {
                let o = num(m, "reference_reuse_rate").filter(|&o| o > 0.0)?;
                Some(num(m, "reuse_rate")? / o * 100.0).filter(|x| x.is_finite())
            },
            fmt: |x| format!("{} %", fixed(x, 1)),
        },
        Col {
            head: "Origin conns",
            help: "connections the origins accepted",
            better: Better::Lower,
            get: |m| num(m, "origin_connections"),
            fmt: count,
        },
        Col {
            head: "p50 ms",
            help: "median latency",
            better: Better::Lower,
            get: |m| num_in(m, "latency_ms", "p50"),
            fmt: |x| fixed(x, 1),
        },
        Col {
            head: "p90 ms",
            help: "90th percentile latency",
            better: Better::Lower,
            get: |m| num_in(m, "latency_ms", "p90"),
            fmt: |x| fixed(x, 1),
        },
        Col {
            head: "p99 ms",
            help: "99th percentile latency",
            better: Better::Lower,
            get: |m| num_in(m, "latency_ms", "p99"),
            fmt: |x| fixed(x, 1),
        },
        Col {
            head: "Throughput rps",
            help: "requests per second over the run",
            better: Better::Higher,
            get: |m| num(m, "throughput_rps"),
            fmt: |x| fixed(x, 1),
        },
        Col {
            head: "Wall s",
            help: "wall-clock duration of the run",
            better: Better::Lower,
            get: |m| num(m, "wall_seconds"),
            fmt: |x| fixed(x, 2),
        },
        Col {
            head: "Gateway CPU s",
            help: "CPU seconds the gateway used (— for modes without one)",
            better: Better::Lower,
            get: |m| num(m, "gateway_cpu_seconds"),
            fmt: |x| fixed(x, 2),
        },
        Col {
            head: "Handshake s paid",
            help: "seconds spent in TCP/TLS handshakes to the origins",
            better: Better::Lower,
            get: |m| num(m, "handshake_seconds_paid"),
            fmt: |x| fixed(x, 2),
        },
    ]
}

/// The best value of a column, when there is something to choose between.
fn best(values: &[Option<f64>], better: Better) -> Option<f64> {
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    if present.len() < 2 || better == Better::Neither {
        return None;
    }
    let (lo, hi) = present
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if lo == hi {
        return None;
    }
    Some(if better == Better::Higher { hi } else { lo })
}

/// The summary table and the reference explanation.
fn summary(out: &mut String, r: &Value, modes: &[Mode]) {
    let cols = columns();
    out.push_str("<section class=\"card\">\n<h2>Summary</h2>\n<div class=\"scroll\"><table>\n<thead><tr><th>Mode</th>");
    for c in &cols {
        let _ = write!(
            out,
            "<th class=\"num\" title=\"{}\">{}</th>",
            esc(c.help),
            esc(c.head)
        );
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    if modes.is_empty() {
        let _ = writeln!(
            out,
            "<tr><td colspan=\"{}\" class=\"muted\">no modes in this report</td></tr>",
            cols.len() + 1
        );
    }
    let values: Vec<Vec<Option<f64>>> = cols
        .iter()
        .map(|c| modes.iter().map(|m| (c.get)(m.v)).collect())
        .collect();
    let bests: Vec<Option<f64>> = cols
        .iter()
        .zip(&values)
        .map(|(c, v)| best(v, c.better))
        .collect();
    for (mi, m) in modes.iter().enumerate() {
        let _ = write!(
            out,
            "<tr><th scope=\"row\">{}{}</th>",
            swatch(m.color),
            esc(&m.name)
        );
        for (ci, c) in cols.iter().enumerate() {
            let v = values[ci][mi];
            let mut class = String::from("num");
            if let (Some(v), Some(b)) = (v, bests[ci]) {
                if (v - b).abs() <= 1e-9 * b.abs().max(1.0) {
                    class.push_str(" best");
                }
            }
            if c.head == "Errors" && v.is_some_and(|e| e != 0.0) {
                class.push_str(" bad");
            }
            let shown = v.map_or_else(|| DASH.to_owned(), c.fmt);
            let _ = write!(out, "<td class=\"{class}\">{}</td>", esc(&shown));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
    out.push_str("<p class=\"note\">Bold: the best value in its column. R = 1 − connections / requests, counted at the origins; R / reference compares a mode with the greedy reference (a heuristic replay, not a bound: a mode can exceed 100 %). Errors are highlighted when non-zero.</p>\n");
    let _ = writeln!(
        out,
        "<h2>Greedy reference</h2>\n<p class=\"prose\">{}</p>\n</section>",
        esc_or_dash(text(r.get("reference")).as_deref())
    );
}

/// The `[ms, fraction]` points of a mode's latency CDF, sorted by latency; malformed points are
/// skipped.
fn cdf_points(m: &Value) -> Vec<(f64, f64)> {
    let Some(list) = m.get("latency_cdf").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut pts: Vec<(f64, f64)> = list
        .iter()
        .filter_map(|p| {
            let x = p.get(0)?.as_f64()?;
            let y = p.get(1)?.as_f64()?;
            (x.is_finite() && y.is_finite() && x >= 0.0).then(|| (x, y.clamp(0.0, 1.0)))
        })
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    pts
}

/// Opens a chart card.
fn card_open(out: &mut String, title: &str) {
    let _ = writeln!(
        out,
        "<section class=\"card chart-card\">\n<h2>{}</h2>\n<figure>",
        esc(title)
    );
}

/// Closes a chart card with its caption (already escaped).
fn card_close(out: &mut String, caption: &str) {
    let _ = writeln!(out, "<figcaption>{caption}</figcaption>\n</figure>");
}

/// Chart 1: latency CDF per mode.
fn chart_latency(out: &mut String, modes: &[Mode]) {
    card_open(out, "Latency CDF per mode");
    let series: Vec<(&Mode, Vec<(f64, f64)>)> = modes
        .iter()
        .map(|m| (m, cdf_points(m.v)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if series.is_empty() {
        out.push_str("<p class=\"empty\">No latency data in this report.</p>\n");
        card_close(out, "");
        out.push_str("</section>\n");
        return;
    }
    let all = series.iter().flat_map(|(_, p)| p.iter().map(|&(x, _)| x));
    let max_x = all.clone().fold(0.0, f64::max);
    let min_x = all.clone().fold(f64::INFINITY, f64::min);
    let min_pos = all.filter(|&x| x > 0.0).fold(f64::INFINITY, f64::min);
    let log = min_pos.is_finite() && max_x / min_pos > 20.0;

    let (left, right, plot_h) = (62.0, 20.0, 300.0);
    let items: Vec<(String, Key)> = series
        .iter()
        .map(|(m, _)| (m.name.clone(), Key::Line(m.color, m.dash)))
        .collect();
    let (legend_svg, legend_h) = legend(&items, left, 8.0, CHART_W - left - right);
    let top = 8.0 + legend_h + 12.0;
    let (x0, x1, y0, y1) = (left, CHART_W - right, top, top + plot_h);
    let h = y1 + 48.0;

    let (lo, hi, ticks) = if log {
        log_ticks(min_pos, max_x)
    } else {
        nice_ticks(min_x, max_x, 7)
    };
    let xs = Scale {
        lo,
        hi,
        log,
        a: x0,
        b: x1,
    };
    let ys = Scale {
        lo: 0.0,
        hi: 1.0,
        log: false,
        a: y1,
        b: y0,
    };

    let mut s = legend_svg;
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        y_tick(&mut s, ys.px(f), x0, x1, &tick_label(f));
    }
    for &t in &ticks {
        x_tick(&mut s, xs.px(t), y0, y1, &tick_label(t));
    }
    axes(&mut s, x0, y0, x1, y1);
    for (m, pts) in &series {
        let points: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", xs.px(x), ys.px(y)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-linejoin=\"round\"{} points=\"{}\"><title>{}</title></polyline>",
            m.color,
            dash_attr(m.dash),
            points.join(" "),
            esc(&m.name)
        );
    }
    let x_label = if log {
        "latency (ms, log scale)"
    } else {
        "latency (ms)"
    };
    axis_title(&mut s, (x0 + x1) / 2.0, y1 + 36.0, false, x_label);
    axis_title(
        &mut s,
        16.0,
        (y0 + y1) / 2.0,
        true,
        "fraction of requests ≤ x",
    );
    svg(out, CHART_W, h, "Latency CDF per mode", &s);
    let scale_note = if log {
        "The x axis is logarithmic because the latencies span more than 20×."
    } else {
        "The x axis is linear."
    };
    card_close(
        out,
        &format!("Share of requests (y) finished within a latency (x), per mode; further left and steeper is better. {scale_note}"),
    );
    out.push_str("</section>\n");
}

/// One mode's numbers for one target.
struct TargetCell {
    /// R at the origin.
    r: Option<f64>,
    /// Reference R.
    reference: Option<f64>,
    /// Requests sent to the target.
    requests: Option<f64>,
    /// Connections the target accepted.
    connections: Option<f64>,
}

/// Target names: the report's targets in order, then any others the modes mention.
fn target_names(report: &Value, modes: &[Mode]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: Option<String>| {
        if let Some(n) = n {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    };
    if let Some(list) = report.get("targets").and_then(Value::as_array) {
        for t in list {
            add(text(t.get("name")));
        }
    }
    for m in modes {
        if let Some(list) = m.v.get("per_target").and_then(Value::as_array) {
            for pt in list {
                add(text(pt.get("target")));
            }
        }
    }
    names
}

/// `[target][mode]` cells for the targets that have any number in any mode.
fn target_grid(names: Vec<String>, modes: &[Mode]) -> Vec<(String, Vec<TargetCell>)> {
    names
        .into_iter()
        .map(|name| {
            let cells: Vec<TargetCell> = modes
                .iter()
                .map(|m| {
                    let entry =
                        m.v.get("per_target")
                            .and_then(Value::as_array)
                            .and_then(|l| {
                                l.iter()
                                    .find(|pt| text(pt.get("target")).as_deref() == Some(&name))
                            });
                    TargetCell {
                        r: entry.and_then(|e| num(e, "reuse_rate")),
                        reference: entry.and_then(|e| num(e, "reference_reuse_rate")),
                        requests: entry.and_then(|e| num(e, "requests")),
                        connections: entry.and_then(|e| num(e, "connections")),
                    }
                })
                .collect();
            (name, cells)
        })
        .filter(|(_, cells)| cells.iter().any(|c| c.r.is_some() || c.reference.is_some()))
        .collect()
}

/// The reference R of a target when every mode that reports one agrees.
fn shared_reference(cells: &[TargetCell]) -> Option<f64> {
    let mut it = cells.iter().filter_map(|c| c.reference);
    let first = it.next()?;
    it.all(|o| (o - first).abs() <= 1e-9).then_some(first)
}

/// Chart 2: R per target, grouped bars per mode, reference markers; then the numbers as a table.
fn chart_reuse(out: &mut String, report: &Value, modes: &[Mode]) {
    card_open(out, "R per target");
    let grid = target_grid(target_names(report, modes), modes);
    if grid.is_empty() {
        out.push_str("<p class=\"empty\">No per-target numbers in this report.</p>\n");
        card_close(out, "");
        out.push_str("</section>\n");
        return;
    }
    let n_t = grid.len() as f64;
    let n_m = modes.len().max(1) as f64;
    let min_v = grid
        .iter()
        .flat_map(|(_, cells)| cells.iter().flat_map(|c| [c.r, c.reference]))
        .flatten()
        .map(|v| v.clamp(0.0, 1.0))
        .fold(1.0, f64::min);
    let lo = (min_v - 0.05).clamp(0.0, 1.0);
    let step = nice_num((1.0 - lo) / 5.0, true);
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;

    let (left, right) = (62.0, 20.0);
    let w = CHART_W.max(left + right + n_t * (n_m * 12.0 + 18.0));
    let group_w = (w - left - right) / n_t;
    let longest = grid
        .iter()
        .map(|(n, _)| clip(n, 24).chars().count())
        .max()
        .unwrap_or(0) as f64;
    let rotate = longest * CHAR_W > group_w - 4.0;
    let bottom = if rotate {
        40.0 + longest * CHAR_W * 0.6
    } else {
        46.0
    };
    let mut items: Vec<(String, Key)> = modes
        .iter()
        .map(|m| (m.name.clone(), Key::Fill(m.color)))
        .collect();
    items.push(("reference R".to_owned(), Key::Mark));
    let (legend_svg, legend_h) = legend(&items, left, 8.0, w - left - right);
    let top = 8.0 + legend_h + 12.0;
    let (x0, x1, y0, y1) = (left, w - right, top, top + 280.0);
    let h = y1 + bottom;
    let ys = Scale {
        lo,
        hi: 1.0,
        log: false,
        a: y1,
        b: y0,
    };

    let mut s = legend_svg;
    for i in 0..=100 {
        let t = ((lo / step).ceil() + f64::from(i)) * step;
        if t > 1.0 + 1e-9 {
            break;
        }
        y_tick(&mut s, ys.px(t), x0, x1, &fixed(t, decimals));
    }
    axes(&mut s, x0, y0, x1, y1);
    let pad = group_w * 0.1;
    let bar_slot = (group_w - 2.0 * pad) / n_m;
    for (gi, (name, cells)) in grid.iter().enumerate() {
        let gx = x0 + gi as f64 * group_w;
        for (mi, (m, c)) in modes.iter().zip(cells).enumerate() {
            let Some(r) = c.r else { continue };
            let bx = gx + pad + mi as f64 * bar_slot;
            let bw = (bar_slot * 0.88).max(1.0);
            let y = ys.px(r).min(y1 - 1.0);
            let _ = write!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} · {}: R {} (reference {}; {} connections / {} requests)</title></rect>",
                y1 - y,
                m.color,
                esc(&m.name),
                esc(name),
                fixed(r, 3),
                c.reference.map_or_else(|| DASH.to_owned(), |o| fixed(o, 3)),
                c.connections.map_or_else(|| DASH.to_owned(), count),
                c.requests.map_or_else(|| DASH.to_owned(), count),
            );
        }
        let mark = |s: &mut String, xa: f64, xb: f64, o: f64| {
            let y = ys.px(o);
            let _ = write!(
                s,
                "<line x1=\"{xa:.1}\" y1=\"{y:.1}\" x2=\"{xb:.1}\" y2=\"{y:.1}\" stroke=\"#1f2328\" stroke-width=\"3\"><title>{}: reference R {}</title></line>",
                esc(name),
                fixed(o, 3)
            );
        };
        if let Some(o) = shared_reference(cells) {
            mark(&mut s, gx + pad * 0.5, gx + group_w - pad * 0.5, o);
        } else {
            for (mi, c) in cells.iter().enumerate() {
                if let Some(o) = c.reference {
                    let bx = gx + pad + mi as f64 * bar_slot;
                    mark(&mut s, bx - 2.0, bx + bar_slot * 0.88 + 2.0, o);
                }
            }
        }
        let label = esc(&clip(name, 24));
        let cx = gx + group_w / 2.0;
        if rotate {
            let ly = y1 + 14.0;
            let _ = write!(
                s,
                "<text class=\"tick\" x=\"{cx:.1}\" y=\"{ly:.1}\" text-anchor=\"end\" transform=\"rotate(-35 {cx:.1} {ly:.1})\">{label}</text>"
            );
        } else {
            let _ = write!(
                s,
                "<text class=\"tick\" x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
                y1 + 16.0
            );
        }
    }
    axis_title(&mut s, 16.0, (y0 + y1) / 2.0, true, "R (reuse rate)");
    axis_title(&mut s, (x0 + x1) / 2.0, h - 8.0, false, "target");
    svg(
        out,
        w,
        h,
        "R per target, per mode, with the greedy reference's R",
        &s,
    );
    card_close(
        out,
        &format!(
            "Bars: R measured at each target's origin per mode; black marker: the greedy reference's R for that target.{}",
            if lo > 0.0 {
                format!(" The y axis starts at {}, not 0.", fixed(lo, 2))
            } else {
                String::new()
            }
        ),
    );
    target_table(out, &grid, modes);
    out.push_str("</section>\n");
}

/// The per-target numbers behind chart 2.
fn target_table(out: &mut String, grid: &[(String, Vec<TargetCell>)], modes: &[Mode]) {
    out.push_str(
        "<div class=\"scroll\"><table>\n<thead><tr><th>Target</th><th class=\"num\">Reference R</th>",
    );
    for m in modes {
        let _ = write!(
            out,
            "<th class=\"num\">{}R · {}</th>",
            swatch(m.color),
            esc(&m.name)
        );
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for (name, cells) in grid {
        let reference = match shared_reference(cells) {
            Some(o) => fixed(o, 3),
            None => {
                let all: Vec<String> = cells
                    .iter()
                    .map(|c| c.reference.map_or_else(|| DASH.to_owned(), |o| fixed(o, 3)))
                    .collect();
                all.join(" / ")
            }
        };
        let _ = write!(
            out,
            "<tr><th scope=\"row\">{}</th><td class=\"num\">{}</td>",
            esc(name),
            esc(&reference)
        );
        for c in cells {
            let r = c.r.map_or_else(|| DASH.to_owned(), |r| fixed(r, 3));
            let detail = match (c.connections, c.requests) {
                (None, None) => String::new(),
                (conns, reqs) => format!(
                    " <span class=\"sub\">{} conn / {} req</span>",
                    conns.map_or_else(|| DASH.to_owned(), count),
                    reqs.map_or_else(|| DASH.to_owned(), count)
                ),
            };
            let _ = write!(out, "<td class=\"num\">{}{detail}</td>", esc(&r));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
}

/// New connections by reason: `(reason, count)`.
type Reasons = Vec<(String, f64)>;

/// A mode's new connections by reason (positive counts only), or `None` when it cannot tell.
fn reasons_of(m: &Value) -> Option<Reasons> {
    let map = m.get("new_by_reason")?.as_object()?;
    let list: Reasons = map
        .iter()
        .filter_map(|(k, v)| {
            let c = v.as_f64()?;
            (c.is_finite() && c > 0.0).then(|| (k.clone(), c))
        })
        .collect();
    (!list.is_empty()).then_some(list)
}

/// Chart 3: new connections by reason per mode, horizontal stacked bars.
fn chart_reasons(out: &mut String, modes: &[Mode]) {
    card_open(out, "New connections by reason");
    let rows: Vec<(&Mode, Option<Reasons>)> = modes.iter().map(|m| (m, reasons_of(m.v))).collect();
    // Reasons present: the pool's order first, then unknown names alphabetically.
    let mut unknown: Vec<String> = rows
        .iter()
        .flat_map(|(_, r)| r.iter().flatten().map(|(k, _)| k.clone()))
        .filter(|k| !REASONS.iter().any(|(n, _)| n == k))
        .collect();
    unknown.sort();
    unknown.dedup();
    let present = |k: &str| {
        rows.iter()
            .any(|(_, r)| r.iter().flatten().any(|(n, _)| n == k))
    };
    let mut order: Vec<(String, &'static str)> = REASONS
        .iter()
        .filter(|(n, _)| present(n))
        .map(|&(n, c)| (n.to_owned(), c))
        .collect();
    for (i, k) in unknown.iter().enumerate() {
        order.push((k.clone(), OTHER_REASONS[i % OTHER_REASONS.len()]));
    }
    if order.is_empty() {
        out.push_str("<p class=\"empty\">No mode reported why it opened connections.</p>\n");
        card_close(out, "");
        out.push_str("</section>\n");
        return;
    }
    let total = |r: &[(String, f64)]| r.iter().map(|(_, c)| c).sum::<f64>();
    let max_total = rows
        .iter()
        .filter_map(|(_, r)| r.as_deref().map(total))
        .fold(0.0, f64::max);

    let longest = modes
        .iter()
        .map(|m| clip(&m.name, 28).chars().count())
        .max()
        .unwrap_or(0) as f64;
    let left = (longest * CHAR_W + 20.0).clamp(90.0, 220.0);
    let right = 56.0;
    let items: Vec<(String, Key)> = order
        .iter()
        .map(|(n, c)| (n.clone(), Key::Fill(c)))
        .collect();
    let (legend_svg, legend_h) = legend(&items, left, 8.0, CHART_W - left - right);
    let top = 8.0 + legend_h + 12.0;
    let row_h = 30.0;
    let (x0, x1, y0) = (left, CHART_W - right, top);
    let y1 = y0 + row_h * rows.len() as f64;
    let h = y1 + 46.0;
    let (lo, hi, ticks) = nice_ticks(0.0, max_total, 7);
    let xs = Scale {
        lo,
        hi,
        log: false,
        a: x0,
        b: x1,
    };

    let mut s = legend_svg;
    for &t in &ticks {
        x_tick(&mut s, xs.px(t), y0, y1, &tick_label(t));
    }
    axes(&mut s, x0, y0, x1, y1);
    for (ri, (m, reasons)) in rows.iter().enumerate() {
        let top = y0 + ri as f64 * row_h;
        let (by, bh) = (top + 6.0, row_h - 12.0);
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            x0 - 8.0,
            by + bh / 2.0 + 4.0,
            esc(&clip(&m.name, 28))
        );
        let Some(reasons) = reasons else {
            let _ = write!(
                s,
                "<text class=\"none\" x=\"{:.1}\" y=\"{:.1}\">not reported (this mode cannot tell)</text>",
                x0 + 6.0,
                by + bh / 2.0 + 4.0
            );
            continue;
        };
        let sum = total(reasons);
        let mut acc = 0.0;
        for (name, color) in &order {
            let Some(&(_, c)) = reasons.iter().find(|(n, _)| n == name) else {
                continue;
            };
            let (xa, xb) = (xs.px(acc), xs.px(acc + c));
            acc += c;
            let _ = write!(
                s,
                "<rect x=\"{xa:.1}\" y=\"{by:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{color}\"><title>{} · {}: {} ({} %)</title></rect>",
                (xb - xa).max(0.5),
                esc(&m.name),
                esc(name),
                count(c),
                fixed(c / sum * 100.0, 1)
            );
            let label = count(c);
            if xb - xa >= text_w(&label) + 6.0 {
                let _ = write!(
                    s,
                    "<text class=\"seg\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" style=\"fill:{}\">{}</text>",
                    (xa + xb) / 2.0,
                    by + bh / 2.0 + 4.0,
                    ink_on(color),
                    esc(&label)
                );
            }
        }
        let _ = write!(
            s,
            "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            xs.px(sum) + 6.0,
            by + bh / 2.0 + 4.0,
            esc(&count(sum))
        );
    }
    axis_title(&mut s, (x0 + x1) / 2.0, y1 + 36.0, false, "new connections");
    svg(out, CHART_W, h, "New connections by reason per mode", &s);
    card_close(
        out,
        "Why each mode opened new connections to the origins (total at the end of each bar).",
    );
    out.push_str("<ul class=\"reasons\">\n");
    for (name, _) in &order {
        let why = crate::report::explain(name);
        let why = if why.is_empty() { DASH } else { why };
        let _ = writeln!(out, "<li><b>{}</b> — {}</li>", esc(name), esc(why));
    }
    out.push_str("</ul>\n</section>\n");
}

/// The targets the origins played.
fn targets(out: &mut String, r: &Value) {
    let Some(list) = r.get("targets").and_then(Value::as_array) else {
        return;
    };
    if list.is_empty() {
        return;
    }
    out.push_str("<section class=\"card\">\n<h2>Targets</h2>\n<div class=\"scroll\"><table>\n<thead><tr><th>Name</th><th>Authority</th><th>Profile</th><th>TLS</th><th>HTTP/2</th><th class=\"num\">Max requests</th><th class=\"num\">Idle timeout</th></tr></thead>\n<tbody>\n");
    for t in list {
        let field = |k: &str| esc_or_dash(text(t.get(k)).as_deref());
        let idle = num(t, "idle_timeout_ms")
            .map_or_else(|| DASH.to_owned(), |ms| format!("{} ms", count(ms)));
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            field("name"),
            field("authority"),
            field("profile"),
            field("tls"),
            field("h2"),
            field("max_requests"),
            esc(&idle)
        );
    }
    out.push_str("</tbody></table></div>\n</section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A representative report: three modes, three targets, a hostile description.
    fn sample() -> Value {
        let cdf = |scale: f64| -> Value {
            let pts: Vec<Value> = (0..=40)
                .map(|i| {
                    let f = f64::from(i) / 40.0;
                    let ms = if i == 0 {
                        0.5
                    } else {
                        scale * (1.0 + f * f * f * 2.0)
                    };
                    json!([ms, f])
                })
                .collect();
            Value::Array(pts)
        };
        json!({
            "scenario": "mixed",
            "description": "Shops, news and an API <script>alert('x')</script> & friends",
            "quick": true,
            "seed": 42,
            "started": "2026-11-23T22:30:00Z",
            "machine": "2 vCPU, Linux 6.18",
            "edgepool_version": "0.1.0",
            "workers": 16,
            "requests_per_worker": 40,
            "delays_ms": {"tcp_connect": 42, "tls_handshake": 85, "ttfb": 108},
            "targets": [
                {"name": "shop-1", "authority": "localhost:40123", "profile": "shop", "tls": true,
                 "h2": false, "max_requests": 100, "idle_timeout_ms": 5000},
                {"name": "news-2", "authority": "localhost:40124", "profile": "news", "tls": true,
                 "h2": true, "max_requests": null, "idle_timeout_ms": 15000},
                {"name": "api-3", "authority": "localhost:40125", "profile": "api", "tls": false,
                 "h2": false, "max_requests": 50, "idle_timeout_ms": 2000}
            ],
            "reference": "The greedy reference replays the request sequence through a greedy pool.",
            "modes": [
                {"mode": "no-keepalive", "requests": 640, "errors": 3, "wall_seconds": 21.5,
                 "throughput_rps": 29.8, "origin_connections": 640, "origin_requests": 640,
                 "reuse_rate": 0.0, "reference_reuse_rate": 0.98,
                 "latency_ms": {"p50": 330.5, "p90": 390.0, "p99": 620.0, "max": 700.0, "mean": 340.0},
                 "latency_cdf": cdf(300.0),
                 "per_target": [
                    {"target": "shop-1", "requests": 300, "connections": 300, "reuse_rate": 0.0, "reference_reuse_rate": 0.98},
                    {"target": "news-2", "requests": 240, "connections": 240, "reuse_rate": 0.0, "reference_reuse_rate": 0.99},
                    {"target": "api-3", "requests": 100, "connections": 100, "reuse_rate": 0.0, "reference_reuse_rate": 0.94}
                 ],
                 "new_by_reason": {},
                 "gateway_cpu_seconds": null, "handshake_seconds_paid": 81.9},
                {"mode": "per-worker", "requests": 640, "errors": 0, "wall_seconds": 9.1,
                 "throughput_rps": 70.3, "origin_connections": 96, "origin_requests": 640,
                 "reuse_rate": 0.85, "reference_reuse_rate": 0.98,
                 "latency_ms": {"p50": 120.4, "p90": 340.0, "p99": 410.0, "max": 450.0, "mean": 160.0},
                 "latency_cdf": cdf(110.0),
                 "per_target": [
                    {"target": "shop-1", "requests": 300, "connections": 48, "reuse_rate": 0.84, "reference_reuse_rate": 0.98},
                    {"target": "news-2", "requests": 240, "connections": 32, "reuse_rate": 0.867, "reference_reuse_rate": 0.99},
                    {"target": "api-3", "requests": 100, "connections": 16, "reuse_rate": 0.84, "reference_reuse_rate": 0.94}
                 ],
                 "new_by_reason": {},
                 "gateway_cpu_seconds": null, "handshake_seconds_paid": 12.3},
                {"mode": "edgepool", "requests": 640, "errors": 0, "wall_seconds": 5.2,
                 "throughput_rps": 123.0, "origin_connections": 20, "origin_requests": 640,
                 "reuse_rate": 0.97, "reference_reuse_rate": 0.98,
                 "latency_ms": {"p50": 110.2, "p90": 130.0, "p99": 250.0, "max": 300.0, "mean": 115.0},
                 "latency_cdf": cdf(100.0),
                 "per_target": [
                    {"target": "shop-1", "requests": 300, "connections": 9, "reuse_rate": 0.97, "reference_reuse_rate": 0.98},
                    {"target": "news-2", "requests": 240, "connections": 3, "reuse_rate": 0.9875, "reference_reuse_rate": 0.99},
                    {"target": "api-3", "requests": 100, "connections": 8, "reuse_rate": 0.92, "reference_reuse_rate": 0.94}
                 ],
                 "new_by_reason": {"cold_key": 3, "max_requests": 12, "idle_expired": 4, "weird_new_reason": 1},
                 "gateway_cpu_seconds": 1.2, "handshake_seconds_paid": 2.5}
            ]
        })
    }

    #[test]
    fn renders_representative_report() {
        let page = render(&sample());
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.trim_end().ends_with("</html>"));
        for mode in ["no-keepalive", "per-worker", "edgepool"] {
            assert!(page.contains(mode), "missing mode {mode}");
        }
        assert_eq!(page.matches("<svg class=\"chart\"").count(), 3);
        assert!(page.contains("viewBox=\"0 0 860 "));
        // The description is escaped, and the page has no script at all.
        assert!(page.contains(
            "Shops, news and an API &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; friends"
        ));
        assert!(!page.to_ascii_lowercase().contains("<script"));
        // Table numbers, best values bold, non-zero errors highlighted.
        assert!(page.contains("<td class=\"num best\">0.970</td>"));
        assert!(page.contains("<td class=\"num best\">110.2</td>"));
        assert!(page.contains("<td class=\"num best\">123.0</td>"));
        assert!(page.contains("<td class=\"num best\">20</td>"));
        assert!(page.contains("<td class=\"num best\">99.0 %</td>"));
        assert!(page.contains("<td class=\"num bad\">3</td>"));
        assert!(page.contains("<td class=\"num best\">0</td>"));
        assert!(page.contains(">330.5<"));
        assert!(page.contains(">81.90<"));
        // Reference R is the same for every mode: shown, never "best".
        assert!(page.contains("<td class=\"num\">0.980</td>"));
        // Gateway CPU is null for two modes.
        assert!(page.contains("<td class=\"num\">—</td>"));
        // Header.
        for s in [
            "mixed",
            "quick",
            "42",
            "2026-11-23T22:30:00Z",
            "2 vCPU, Linux 6.18",
            "0.1.0",
            "16 workers × 40 requests = 640 requests",
            "TCP connect 42 ms · TLS handshake 85 ms · TTFB 108 ms",
            "The greedy reference replays",
        ] {
            assert!(page.contains(s), "missing {s}");
        }
        // Charts: log scale (0.5 .. 900 ms), per-target groups, reasons and their legend.
        assert!(page.contains("latency (ms, log scale)"));
        assert!(page.contains("shop-1") && page.contains("news-2") && page.contains("api-3"));
        assert!(page.contains("reference R"));
        assert!(page.contains("max_requests") && page.contains("weird_new_reason"));
        assert!(page.contains("not reported"));
        assert!(page.contains(crate::report::explain("cold_key")));
    }

    #[test]
    fn no_external_assets() {
        let page = render(&sample());
        assert!(!page.contains("http://"), "page references http://");
        assert!(!page.contains("https://"), "page references https://");
        for bad in [
            "<link", "<script", "<img", "<iframe", "@import", "url(", "src=",
        ] {
            assert!(!page.contains(bad), "page contains {bad}");
        }
        // A URL in the report's own text appears (escaped) and is the only one.
        let mut r = sample();
        r["description"] = json!("see https://example.com/x?a=1&b=2");
        let page = render(&r);
        assert_eq!(page.matches("https://").count(), 1);
        assert!(page.contains("see https://example.com/x?a=1&amp;b=2"));
        assert!(!page.contains("http://"));
    }

    #[test]
    fn tolerates_missing_and_mistyped_fields() {
        for r in [
            json!({}),
            json!({"modes": [{}]}),
            json!(null),
            json!([1, 2]),
            json!({"modes": 5, "targets": "x", "delays_ms": [], "quick": "yes"}),
            json!({"modes": [null, 3, "x", {
                "mode": 7,
                "requests": "many",
                "latency_ms": [],
                "latency_cdf": [[1], "x", [null, 2], [-5, 0.5], [5, 7], [0, 0]],
                "per_target": [{}, {"target": "t", "reuse_rate": -3, "reference_reuse_rate": 2}],
                "new_by_reason": {"x": -1, "y": "z", "z": 1e300},
                "reuse_rate": 0.5, "reference_reuse_rate": 0
            }]}),
            json!({"modes": [{"mode": "a", "latency_cdf": [[0, 0], [0, 1]]},
                             {"mode": "b", "latency_cdf": [[1e300, 1]],
                              "per_target": [{"target": "t", "reuse_rate": 1}]}]}),
        ] {
            let page = render(&r);
            assert!(page.contains("</html>"), "{r}");
            assert!(page.contains(DASH), "{r}");
        }
        let page = render(&json!({"modes": [{}]}));
        assert!(page.contains("mode 1"));
        assert!(page.contains("No latency data"));
    }

    #[test]
    fn mode_names_are_escaped_everywhere() {
        let r = json!({"modes": [{"mode": "<b>x</b>", "reuse_rate": 0.5,
            "latency_cdf": [[1, 0], [2, 1]],
            "per_target": [{"target": "\"t\"", "reuse_rate": 0.5}],
            "new_by_reason": {"<i>": 2}}]});
        let page = render(&r);
        assert!(!page.contains("<b>x</b>"));
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;"));
        assert!(page.contains("&quot;t&quot;"));
        assert!(!page.contains("<i>"));
    }

    #[test]
    fn linear_scale_for_narrow_latency_range() {
        let r = json!({"modes": [{"mode": "edgepool",
            "latency_cdf": [[100.0, 0.0], [150.0, 0.5], [300.0, 1.0]]}]});
        let page = render(&r);
        assert!(page.contains("latency (ms)"));
        assert!(!page.contains("log scale"));
    }

    #[test]
    fn ticks_and_formatting() {
        let (lo, hi, t) = nice_ticks(103.0, 298.0, 7);
        assert!(lo <= 103.0 && hi >= 298.0 && t.len() >= 3);
        let (lo, hi, t) = log_ticks(0.5, 300.0);
        assert_eq!((lo, hi), (0.5, 500.0));
        assert_eq!(t.first(), Some(&0.5));
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(0.05), "0.05");
        assert_eq!(tick_label(200.0), "200");
        assert_eq!(tick_label(20_000.0), "20k");
        assert_eq!(fixed(-0.0001, 2), "0.00");
        assert_eq!(count(640.0), "640");
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(clip("abcdef", 4), "abc…");
    }

    #[test]
    fn writes_sample_page() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&dir).expect("create target dir");
        let path = dir.join("lab-sample.html");
        std::fs::write(&path, render(&sample())).expect("write sample page");
        assert!(path.exists());
    }
}
