//! `[cluster]`: several ingest hosts sharing state in etcd (issue 17, opt-in). Without this
//! section nothing about nsfail changes.
//!
//! ```toml
//! [cluster]
//! name = "studio"                    # etcd key prefix /nsfail/<name>/
//! host = "ingest-1"                  # this host's name (default: the hostname)
//! etcd = ["http://10.0.0.10:2379"]   # etcd endpoints
//! lease_s = 1                        # a host whose lease expires is down
//! announce_table = 2345              # kernel routing table holding the ingest addresses
//! ```

use super::*;

/// The default `cluster.lease_s`.
pub const DEFAULT_LEASE_S: u64 = 1;
/// The longest `cluster.lease_s` accepted: beyond this a dead host stays "up" for too long.
pub const MAX_LEASE_S: u64 = 3600;

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// The cluster's name: its keys live under `/nsfail/<name>/`.
    pub name: String,
    /// This host's name; the hostname when left out (see [`Cluster::host_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// etcd endpoints, `http://HOST:PORT` or `https://HOST:PORT`.
    pub etcd: Vec<String>,
    /// The host's lease: a host whose lease expires is down.
    #[serde(default = "default_lease_s")]
    pub lease_s: u64,
    /// The kernel routing table holding the ingest addresses this host serves (anycast; not
    /// used yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_table: Option<u32>,
}

fn default_lease_s() -> u64 {
    DEFAULT_LEASE_S
}

impl Cluster {
    /// This host's name: `host`, else the kernel's hostname.
    pub fn host_name(&self) -> String {
        match &self.host {
            Some(host) => host.clone(),
            None => fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
        }
    }

    /// The etcd key prefix, `/nsfail/<name>/`.
    pub fn prefix(&self) -> String {
        format!("/nsfail/{}/", self.name)
    }
}

/// Whether `name` may name a channel, encoder or host (the config's rules for names).
pub fn valid_name(name: &str) -> bool {
    name_problem(name).is_none()
}

/// Why `endpoint` is not an etcd endpoint (`http://HOST:PORT` or `https://HOST:PORT`).
pub(super) fn endpoint_problem(endpoint: &str) -> Option<String> {
    let Some(rest) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
    else {
        return Some("must start with http:// or https://".into());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Some("has no port (http://HOST:PORT)".into());
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
        return Some(format!("has no usable host ({host:?})"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Some(format!("has a bad port {port:?}")),
        Ok(_) => None,
    }
}

pub(super) fn cluster_problems(c: &Cluster, out: &mut Vec<Problem>) {
    if let Some(why) = name_problem(&c.name) {
        out.push(Problem::new(
            at!["cluster", "name"],
            format!("cluster.name {:?} {why}", c.name),
        ));
    }
    if let Some(host) = &c.host
        && let Some(why) = name_problem(host)
    {
        out.push(Problem::new(
            at!["cluster", "host"],
            format!("cluster.host {host:?} {why}"),
        ));
    }
    if c.etcd.is_empty() {
        out.push(Problem::new(
            at!["cluster", "etcd"],
            "cluster.etcd lists no endpoint".into(),
        ));
    }
    for (i, endpoint) in c.etcd.iter().enumerate() {
        if let Some(why) = endpoint_problem(endpoint) {
            out.push(Problem::new(
                at!["cluster", "etcd", i],
                format!("cluster.etcd endpoint {endpoint:?} {why}"),
            ));
        }
    }
    if c.lease_s == 0 || c.lease_s > MAX_LEASE_S {
        out.push(Problem::new(
            at!["cluster", "lease_s"],
            format!(
                "cluster.lease_s {} is out of range 1..={MAX_LEASE_S}",
                c.lease_s
            ),
        ));
    }
    if let Some(table) = c.announce_table
        && matches!(table, 0 | 253..=255)
    {
        out.push(Problem::new(
            at!["cluster", "announce_table"],
            format!(
                "cluster.announce_table {table} is a reserved kernel table (0, 253 default, 254 main, 255 local)"
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[ingest]\ninterface = \"eth0\"\n";

    fn parse(cluster: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}{cluster}"), "t.toml").map_err(|e| e.to_string())
    }

    #[track_caller]
    fn refused(cluster: &str, at: &str, needle: &str) {
        let e = parse(cluster).expect_err("a bad [cluster] was accepted");
        assert!(e.starts_with(at), "expected {at}, got {e}");
        assert!(e.contains(needle), "expected {needle:?} in {e}");
    }

    #[test]
    fn no_cluster_section_is_none() {
        assert_eq!(parse("").unwrap().cluster, None);
    }

    #[test]
    fn full_section_parses_and_round_trips() {
        let cfg = parse(
            "[cluster]\nname = \"studio\"\nhost = \"ingest-1\"\netcd = [\"http://10.0.0.10:2379\", \"https://[::1]:2379/\"]\nlease_s = 2\nannounce_table = 2345\n",
        )
        .unwrap();
        let c = cfg.cluster.clone().unwrap();
        assert_eq!(c.name, "studio");
        assert_eq!(c.host_name(), "ingest-1");
        assert_eq!(c.lease_s, 2);
        assert_eq!(c.announce_table, Some(2345));
        assert_eq!(c.prefix(), "/nsfail/studio/");
        let again = Config::parse(&cfg.to_toml(), "again").unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn the_parse_in_pieces_keeps_the_cluster_section() {
        let text = "[ingest]\ninterface = \"eth0\"\n[cluster]\nname = \"s\"\netcd = [\"http://127.0.0.1:2379\"]\n\
                    [[encoder]]\nname = \"e\"\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:00:01\"\n\
                    [[channel]]\nname = \"cam1\"\nlisten = \"10.0.0.1:5000\"\nencoders = [\"e\"]\n";
        let whole: Config = toml::from_str(text).unwrap();
        let pieces = super::super::pieces::parse(text, 1).expect("cut in pieces");
        assert_eq!(pieces, whole);
        assert_eq!(pieces.cluster.unwrap().name, "s");
    }

    #[test]
    fn defaults_host_and_lease() {
        let c = parse("[cluster]\nname = \"s\"\netcd = [\"http://127.0.0.1:2379\"]\n")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.lease_s, DEFAULT_LEASE_S);
        assert_eq!(c.host, None);
        let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(c.host_name(), hostname.trim());
    }

    #[test]
    fn bad_sections_name_their_line() {
        let ok_etcd = "etcd = [\"http://127.0.0.1:2379\"]\n";
        refused(
            &format!("[cluster]\nname = \"s\"\n{ok_etcd}colour = 1\n"),
            "t.toml:6:",
            "unknown field `colour`",
        );
        refused(
            &format!("[cluster]\nname = \"\"\n{ok_etcd}"),
            "t.toml:4:",
            "cluster.name \"\" is empty",
        );
        refused(
            &format!("[cluster]\nname = \"a/b\"\n{ok_etcd}"),
            "t.toml:4:",
            "contains '/'",
        );
        refused(
            &format!("[cluster]\nname = \"s\"\nhost = \"x y\"\n{ok_etcd}"),
            "t.toml:5:",
            "cluster.host",
        );
        refused(
            "[cluster]\nname = \"s\"\netcd = []\n",
            "t.toml:5:",
            "lists no endpoint",
        );
        refused(
            "[cluster]\nname = \"s\"\netcd = [\"http://a:1\",\n  \"10.0.0.1:2379\"]\n",
            "t.toml:6:",
            "must start with http://",
        );
        refused(
            "[cluster]\nname = \"s\"\netcd = [\"http://10.0.0.1\"]\n",
            "t.toml:5:",
            "has no port",
        );
        refused(
            "[cluster]\nname = \"s\"\netcd = [\"http://10.0.0.1:0\"]\n",
            "t.toml:5:",
            "bad port",
        );
        refused(
            &format!("[cluster]\nname = \"s\"\n{ok_etcd}lease_s = 0\n"),
            "t.toml:6:",
            "cluster.lease_s 0 is out of range",
        );
        refused(
            &format!("[cluster]\nname = \"s\"\n{ok_etcd}announce_table = 254\n"),
            "t.toml:6:",
            "reserved kernel table",
        );
        refused(
            "[cluster]\nname = \"s\"\n",
            "t.toml:3:",
            "missing field `etcd`",
        );
    }
}
