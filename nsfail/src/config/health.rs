//! An encoder's health check, built once from `encoder.health` (and, for `srt` and `flow`, the
//! channels it serves): one enum variant per kind with exactly what that kind needs, so the
//! probes, the flow/session judge and the egress policy never check the raw fields again.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use super::{Channel, Config, Encoder, Health, HealthKind, HttpUrl, Protocol};
use crate::dataplane::{AllowProto, HealthAnswers};

/// A validated health check: what to probe, and how often and how strictly.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    pub check: Check,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make a down encoder healthy (at least 1).
    pub rise: u32,
    /// Consecutive failures that make a healthy encoder down (at least 1).
    pub fall: u32,
}

/// What a health check asks, per kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    /// UDP echo at this address.
    Udp(SocketAddr),
    /// TCP connect to this address.
    Tcp(SocketAddr),
    /// HTTP GET of this URL; 2xx is healthy.
    Http(HttpUrl),
    /// This program inside the encoder's namespace; exit 0 is healthy.
    Exec {
        program: String,
        args: Vec<String>,
        netns: Option<String>,
        /// The encoder's `env`, the whole environment the program gets.
        env: BTreeMap<String, String>,
    },
    /// The SRT listener at this address: an induction handshake while it has no session, the
    /// session itself (the encoder's replies) while it has one.
    Srt(SocketAddr),
    /// The data plane as the probe while the encoder is active; while it is not, the SRT
    /// induction handshake to `standby` judges it (so it can come back).
    Flow { standby: Option<SocketAddr> },
}

impl Check {
    /// The config's name of this kind.
    pub fn kind(&self) -> HealthKind {
        match self {
            Check::Udp(_) => HealthKind::Udp,
            Check::Tcp(_) => HealthKind::Tcp,
            Check::Http(_) => HealthKind::Http,
            Check::Exec { .. } => HealthKind::Exec,
            Check::Srt(_) => HealthKind::Srt,
            Check::Flow { .. } => HealthKind::Flow,
        }
    }

    /// The network probe that runs for this check, if any: the SRT induction target of an
    /// `srt` check or of a `flow` check's standby, or the check itself.
    pub fn induction_target(&self) -> Option<SocketAddr> {
        match self {
            Check::Srt(at) => Some(*at),
            Check::Flow { standby } => *standby,
            _ => None,
        }
    }

    /// Where the encoder's answers to the probe come from, for its egress policy (they pass
    /// to the prober's address only). `None` for `exec` (it runs inside the namespace).
    pub fn answers(&self) -> Option<HealthAnswers> {
        let answers = |proto, port| {
            Some(HealthAnswers {
                proto,
                port,
                prober: None,
            })
        };
        match self {
            Check::Udp(at) => answers(AllowProto::Udp, at.port()),
            Check::Tcp(at) => answers(AllowProto::Tcp, at.port()),
            Check::Http(url) => answers(AllowProto::Tcp, url.port),
            Check::Srt(at) => answers(AllowProto::Udp, at.port()),
            Check::Flow { standby } => standby.and_then(|at| answers(AllowProto::Udp, at.port())),
            Check::Exec { .. } => None,
        }
    }

    /// Whether the controller judges this check from data-plane counters (`flow`, and an
    /// `srt` check while a session is live).
    pub fn watches_replies(&self) -> bool {
        matches!(self, Check::Srt(_) | Check::Flow { .. })
    }
}

/// A health setting that cannot be used, blamed on one key of `encoder.health`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthProblem {
    pub key: &'static str,
    pub message: String,
}

impl Config {
    /// Builds `encoder`'s health check; every problem with its settings, or the check.
    pub fn health_check(&self, encoder: &Encoder) -> Result<HealthCheck, Vec<HealthProblem>> {
        HealthCheck::build(encoder, &self.channels)
    }

    /// The health checks of every encoder whose settings are valid, by name.
    pub fn health_checks(&self) -> Vec<(String, HealthCheck)> {
        self.encoders
            .iter()
            .filter_map(|e| Some((e.name.clone(), self.health_check(e).ok()?)))
            .collect()
    }
}

impl HealthCheck {
    /// Builds `encoder`'s health check, given the channels of its config (an `srt` or `flow`
    /// check takes its port from them); every problem with its settings, or the check. The
    /// one place health settings are checked. Long because it is one match arm per health
    /// kind, each with its own settings' checks.
    pub fn build(encoder: &Encoder, channels: &[Channel]) -> Result<Self, Vec<HealthProblem>> {
        let health = &encoder.health;
        let mut problems = Vec::new();
        let mut push = |key: &'static str, message: String| {
            problems.push(HealthProblem { key, message });
        };
        let kind = health.kind;
        let at = |port| SocketAddr::new(encoder.address, port);
        let check = match kind {
            HealthKind::Udp | HealthKind::Tcp => match health.port {
                None => {
                    push(
                        "kind",
                        format!(
                            "health kind \"{kind}\" needs a port (health = {{ kind = \"{kind}\", \
                             port = N }})"
                        ),
                    );
                    None
                }
                Some(0) => {
                    push("port", "port 0 is not a valid health-check port".into());
                    None
                }
                Some(p) if kind == HealthKind::Udp => Some(Check::Udp(at(p))),
                Some(p) => Some(Check::Tcp(at(p))),
            },
            HealthKind::Http => match health.url.as_deref() {
                None => {
                    push(
                        "kind",
                        "health kind \"http\" needs a url (url = \"http://HOST:PORT/PATH\")".into(),
                    );
                    None
                }
                Some(url) if !url.starts_with("http://") || url.len() == "http://".len() => {
                    push(
                        "url",
                        format!("health url {url:?} must start with http:// and name a host"),
                    );
                    None
                }
                Some(url) => match HttpUrl::parse(url) {
                    Ok(url) => Some(Check::Http(url)),
                    Err(why) => {
                        push("url", why);
                        None
                    }
                },
            },
            HealthKind::Exec => match health.command.as_deref() {
                Some([program, args @ ..]) if !program.is_empty() => Some(Check::Exec {
                    program: program.clone(),
                    args: args.to_vec(),
                    netns: encoder.namespace(),
                    env: encoder.env.clone(),
                }),
                _ => {
                    push(
                        "command",
                        "health kind \"exec\" needs a non-empty command (command = [\"PROGRAM\", \
                         \"ARG\"])"
                            .into(),
                    );
                    None
                }
            },
            HealthKind::Srt => match health.port {
                Some(0) => {
                    push("port", "port 0 is not a valid health-check port".into());
                    None
                }
                Some(p) => Some(Check::Srt(at(p))),
                None => match srt_ports(channels, &encoder.name)[..] {
                    [p] => Some(Check::Srt(at(p))),
                    ref ports => {
                        push("kind", srt_port_missing(ports));
                        None
                    }
                },
            },
            HealthKind::Flow => match srt_ports(channels, &encoder.name)[..] {
                // Judged only while active: nothing probes it in standby (an encoder of
                // plain UDP channels has nothing to answer a probe with).
                [] => Some(Check::Flow { standby: None }),
                [first, ..] => Some(Check::Flow {
                    standby: Some(at(first)),
                }),
            },
        };
        unused_keys(health, &mut push);
        timing_problems(health, &mut push);
        match check {
            Some(check) if problems.is_empty() => Ok(HealthCheck {
                check,
                interval: Duration::from_millis(health.interval_ms),
                timeout: Duration::from_millis(health.timeout_ms),
                rise: health.rise,
                fall: health.fall,
            }),
            _ => Err(problems),
        }
    }
}

/// The distinct encoder-side ports of the SRT channels `encoder` serves, in order.
fn srt_ports(channels: &[Channel], encoder: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = channels
        .iter()
        .filter(|c| c.protocol == Protocol::Srt && c.encoders.iter().any(|e| e == encoder))
        .map(|c| c.encoder_port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn srt_port_missing(ports: &[u16]) -> String {
    let why = if ports.is_empty() {
        "it serves no SRT channel to take it from".to_owned()
    } else {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!(
            "it serves SRT channels on {} ports ({})",
            ports.len(),
            list.join(", ")
        )
    };
    format!("health kind \"srt\" needs a port: {why} (health = {{ kind = \"srt\", port = N }})")
}

fn unused_keys(health: &Health, push: &mut impl FnMut(&'static str, String)) {
    let kind = health.kind;
    let unused = [
        (
            "port",
            health.port.is_some(),
            matches!(kind, HealthKind::Udp | HealthKind::Tcp | HealthKind::Srt),
        ),
        ("url", health.url.is_some(), kind == HealthKind::Http),
        (
            "command",
            health.command.is_some(),
            kind == HealthKind::Exec,
        ),
    ];
    for (key, set, used) in unused {
        if set && !used {
            push(key, format!("health kind \"{kind}\" does not use `{key}`"));
        }
    }
}

fn timing_problems(health: &Health, push: &mut impl FnMut(&'static str, String)) {
    for (key, value) in [
        ("interval_ms", health.interval_ms),
        ("timeout_ms", health.timeout_ms),
        ("rise", u64::from(health.rise)),
        ("fall", u64::from(health.fall)),
    ] {
        if value == 0 {
            push(key, format!("health {key} must be at least 1"));
        }
    }
    // With a zero interval the problem is the interval, reported above.
    if health.interval_ms > 0 && health.timeout_ms > health.interval_ms {
        push(
            "timeout_ms",
            format!(
                "health timeout_ms ({}) must not exceed interval_ms ({}): one probe at a time",
                health.timeout_ms, health.interval_ms
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    fn config(health: &str, channels: &[(&str, u16, &str)]) -> Result<Config, ConfigError> {
        let mut text = format!(
            "[ingest]\ninterface = \"eth0\"\n\n[[encoder]]\nname = \"enc-a\"\n\
             address = \"10.0.0.2\"\nhealth = {health}\n"
        );
        for (i, (name, port, protocol)) in channels.iter().enumerate() {
            text.push_str(&format!(
                "\n[[channel]]\nname = \"{name}\"\nlisten = \"10.0.9.1:{}\"\nport = {port}\n\
                 encoders = [\"enc-a\"]\nprotocol = \"{protocol}\"\n",
                5000 + i
            ));
        }
        Config::parse(&text, "t.toml")
    }

    fn check(cfg: &Config) -> Check {
        cfg.health_check(&cfg.encoders[0]).unwrap().check
    }

    #[test]
    fn an_srt_check_takes_the_port_of_the_one_srt_channel() {
        let cfg = config(
            "{ kind = \"srt\" }",
            &[("cam1", 7000, "srt"), ("cam2", 7100, "udp")],
        )
        .unwrap();
        assert_eq!(check(&cfg), Check::Srt("10.0.0.2:7000".parse().unwrap()));
        let answers = check(&cfg).answers().unwrap();
        assert_eq!((answers.proto, answers.port), (AllowProto::Udp, 7000));
        let given = config("{ kind = \"srt\", port = 7200 }", &[]).unwrap();
        assert_eq!(check(&given), Check::Srt("10.0.0.2:7200".parse().unwrap()));
    }

    #[test]
    fn an_srt_check_without_a_port_to_derive_is_an_error_naming_the_line() {
        let two = config(
            "{ kind = \"srt\" }",
            &[("a", 7000, "srt"), ("b", 7100, "srt")],
        )
        .unwrap_err()
        .to_string();
        assert!(two.starts_with("t.toml:7:"), "{two}");
        assert!(two.contains("2 ports (7000, 7100)"), "{two}");
        let none = config("{ kind = \"srt\" }", &[]).unwrap_err().to_string();
        assert!(none.contains("serves no SRT channel"), "{none}");
        let zero = config("{ kind = \"srt\", port = 0 }", &[])
            .unwrap_err()
            .to_string();
        assert!(zero.contains("port 0"), "{zero}");
    }

    #[test]
    fn a_flow_check_stands_by_on_its_srt_channel() {
        let srt = config("{ kind = \"flow\" }", &[("cam1", 7000, "srt")]).unwrap();
        assert_eq!(
            check(&srt),
            Check::Flow {
                standby: Some("10.0.0.2:7000".parse().unwrap())
            }
        );
        let alone = config("{ kind = \"flow\" }", &[]).unwrap();
        assert_eq!(check(&alone), Check::Flow { standby: None });
        assert_eq!(check(&alone).answers(), None);
        let udp = config("{ kind = \"flow\" }", &[("cam1", 7000, "udp")]).unwrap();
        assert_eq!(check(&udp), Check::Flow { standby: None });
        // Beside an SRT channel, a UDP one is judged while active like any other.
        let both = config(
            "{ kind = \"flow\" }",
            &[("cam1", 7000, "srt"), ("cam2", 7002, "udp")],
        )
        .unwrap();
        assert!(matches!(check(&both), Check::Flow { standby: Some(_) }));
    }

    #[test]
    fn every_kind_is_built_once_with_what_it_needs() {
        let udp = config("{ kind = \"udp\", port = 9000 }", &[]).unwrap();
        assert_eq!(check(&udp), Check::Udp("10.0.0.2:9000".parse().unwrap()));
        let http = config("{ kind = \"http\", url = \"http://10.0.0.2:8080/h\" }", &[]).unwrap();
        assert_eq!(check(&http).answers().unwrap().port, 8080);
        let exec = config("{ kind = \"exec\", command = [\"true\", \"x\"] }", &[]).unwrap();
        assert_eq!(
            check(&exec),
            Check::Exec {
                program: "true".into(),
                args: vec!["x".into()],
                netns: None,
                env: BTreeMap::new(),
            }
        );
        let unused = config("{ kind = \"flow\", port = 9 }", &[]).unwrap_err();
        assert!(
            unused.to_string().contains("does not use `port`"),
            "{unused}"
        );
    }
}
