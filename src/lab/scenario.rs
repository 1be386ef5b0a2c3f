//! Lab scenarios: TOML files (`lab/scenarios/*.toml`, embedded in the binary) describing the
//! targets' behaviour, the injected delays, the optional exits and the workload.
use std::time::Duration;

use serde::Deserialize;

/// The scenarios shipped with edgepool (`--scenario NAME`).
pub const BUILTIN: [(&str, &str); 6] = [
    ("mixed", include_str!("../../lab/scenarios/mixed.toml")),
    (
        "datacenter",
        include_str!("../../lab/scenarios/datacenter.toml"),
    ),
    ("waf", include_str!("../../lab/scenarios/waf.toml")),
    ("lb", include_str!("../../lab/scenarios/lb.toml")),
    (
        "warmpath",
        include_str!("../../lab/scenarios/warmpath.toml"),
    ),
    (
        "residential",
        include_str!("../../lab/scenarios/residential.toml"),
    ),
];

/// One lab scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name.
    pub name: String,
    /// What it models.
    #[serde(default)]
    pub description: String,
    /// Seed of the workload (target choice, pacing) and of the origins' random behaviour.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Concurrent workers.
    pub workers: usize,
    /// Requests per worker in a full run.
    pub requests_per_worker: usize,
    /// Requests per worker with `--quick`.
    pub quick_requests_per_worker: usize,
    /// Fraction of requests followed by a pause (`pace`); the rest are back to back.
    #[serde(default)]
    pub paced_fraction: f64,
    /// The pause after a paced request.
    #[serde(default, with = "humantime_serde")]
    pub pace: Duration,
    /// Zipf exponent of target popularity (weight of the k-th target = 1 / k^s).
    #[serde(default = "default_zipf")]
    pub zipf_s: f64,
    /// Injected delays (defaults: the domain note's trace, 42 / 85 / 108 ms).
    #[serde(default)]
    pub delays: Delays,
    /// Target groups, most popular first.
    pub targets: Vec<TargetGroup>,
    /// Exits (CONNECT proxies) between workers/edgepool and the targets.
    #[serde(default)]
    pub exits: Option<ExitsProfile>,
}

fn default_seed() -> u64 {
    42
}
fn default_zipf() -> f64 {
    1.0
}

/// Injected delays: what a new connection and a response cost on the internet.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Delays {
    /// Added after accept (TCP connect).
    #[serde(with = "humantime_serde")]
    pub tcp_connect: Duration,
    /// Added before the TLS handshake answer.
    #[serde(with = "humantime_serde")]
    pub tls_handshake: Duration,
    /// Added before every response head.
    #[serde(with = "humantime_serde")]
    pub ttfb: Duration,
}

impl Default for Delays {
    fn default() -> Self {
        Delays {
            tcp_connect: Duration::from_millis(42),
            tls_handshake: Duration::from_millis(85),
            ttfb: Duration::from_millis(108),
        }
    }
}

/// `count` targets with one behaviour profile.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroup {
    /// Profile name (targets are `name-1`, `name-2`, ...).
    pub name: String,
    /// How many targets.
    #[serde(default = "one")]
    pub count: usize,
    /// HTTPS.
    #[serde(default)]
    pub tls: bool,
    /// Offer HTTP/2 (with tls).
    #[serde(default)]
    pub h2: bool,
    /// HTTP/2 stream limit.
    #[serde(default = "default_streams")]
    pub max_concurrent_streams: u32,
    /// The server closes connections idle this long.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Requests per connection before the server closes it.
    #[serde(default)]
    pub max_requests: Option<u64>,
    /// HTTP/2: GOAWAY after every N streams.
    #[serde(default)]
    pub goaway_every: Option<u64>,
    /// Fraction of connections reset when idle.
    #[serde(default)]
    pub rst_idle_fraction: f64,
    /// Response body bytes.
    #[serde(default = "default_body")]
    pub body_bytes: usize,
}

fn one() -> usize {
    1
}
fn default_streams() -> u32 {
    100
}
fn default_body() -> usize {
    2048
}

/// Exits in front of the targets.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitsProfile {
    /// Number of exit proxies.
    pub count: usize,
    /// How workers that manage their own proxies pick an exit: `request` (a new random exit
    /// per request, like a rotating proxy list) or `sticky` (keep one for `sticky_window`).
    pub worker_rotation: WorkerRotation,
    /// edgepool's `exits.sticky_window` (and the workers' own window with `sticky`).
    #[serde(with = "humantime_serde")]
    pub sticky_window: Duration,
}

/// How self-managed workers rotate exits.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRotation {
    /// New random exit per request.
    Request,
    /// Same exit for the sticky window.
    Sticky,
}

impl Scenario {
    /// Parses and checks a scenario document; errors name the key.
    pub fn from_toml(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    /// A built-in scenario by name, or a file.
    pub fn load(name_or_file: &str) -> Result<Scenario, String> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_file) {
            return Scenario::from_toml(text).map_err(|e| format!("scenario {name_or_file}: {e}"));
        }
        let path = std::path::Path::new(name_or_file);
        if path.exists() {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            return Scenario::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()));
        }
        Err(format!(
            "no scenario {name_or_file:?}: not a built-in ({}) and no such file",
            BUILTIN.map(|(n, _)| n).join(", ")
        ))
    }

    fn validate(&self) -> Result<(), String> {
        if self.workers == 0 || self.workers > 1024 {
            return Err("workers: must be 1..=1024".into());
        }
        if self.requests_per_worker == 0 || self.quick_requests_per_worker == 0 {
            return Err(
                "requests_per_worker and quick_requests_per_worker: must be at least 1".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.paced_fraction) {
            return Err("paced_fraction: must be between 0 and 1".into());
        }
        if !(0.0..=4.0).contains(&self.zipf_s) {
            return Err("zipf_s: must be between 0 and 4".into());
        }
        if self.targets.is_empty() {
            return Err("targets: at least one [[targets]] group".into());
        }
        for (i, t) in self.targets.iter().enumerate() {
            if t.count == 0 {
                return Err(format!("targets[{i}].count: must be at least 1"));
            }
            if !(0.0..=1.0).contains(&t.rst_idle_fraction) {
                return Err(format!(
                    "targets[{i}].rst_idle_fraction: must be between 0 and 1"
                ));
            }
            if t.h2 && !t.tls {
                return Err(format!(
                    "targets[{i}].h2: HTTP/2 needs tls = true in the lab"
                ));
            }
            if t.max_requests == Some(0) || t.goaway_every == Some(0) {
                return Err(format!(
                    "targets[{i}]: max_requests / goaway_every must be at least 1"
                ));
            }
        }
        if let Some(x) = &self.exits {
            if x.count == 0 || x.count > 64 {
                return Err("exits.count: must be 1..=64".into());
            }
            if self.targets.iter().any(|t| !t.tls) {
                return Err(
                    "exits: the lab's exits tunnel HTTPS only; make every target tls".into(),
                );
            }
        }
        Ok(())
    }

    /// Requests per worker for this run.
    pub fn per_worker(&self, quick: bool) -> usize {
        if quick {
            self.quick_requests_per_worker
        } else {
            self.requests_per_worker
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_scenario_parses_and_the_required_ones_exist() {
        for (name, text) in BUILTIN {
            let s = Scenario::from_toml(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.name, name);
            assert!(s.quick_requests_per_worker <= s.requests_per_worker);
        }
        for want in ["mixed", "datacenter", "waf", "lb", "residential"] {
            assert!(Scenario::load(want).is_ok(), "{want}");
        }
        let r = Scenario::load("residential").unwrap();
        assert_eq!(r.exits.unwrap().worker_rotation, WorkerRotation::Request);
        assert_eq!(Scenario::load("mixed").unwrap().delays, Delays::default());
    }

    #[test]
    fn bad_scenarios_name_the_key() {
        let base =
            "name = \"x\"\nworkers = 2\nrequests_per_worker = 5\nquick_requests_per_worker = 2\n";
        let e = Scenario::from_toml(base).unwrap_err();
        assert!(e.contains("targets"), "{e}");
        let e = Scenario::from_toml(&format!("{base}[[targets]]\nname = \"a\"\nh2 = true\n"))
            .unwrap_err();
        assert!(e.contains("targets[0].h2"), "{e}");
        let e = Scenario::from_toml(&format!("{base}colour = 1\n[[targets]]\nname = \"a\"\n"))
            .unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = Scenario::from_toml(&format!(
            "{base}[[targets]]\nname = \"a\"\n[exits]\ncount = 2\nworker_rotation = \"request\"\nsticky_window = \"1m\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("exits"), "{e}");
        assert!(Scenario::load("nope").unwrap_err().contains("mixed"));
    }
}
