//! BIRD 2 for anycast labs (issue 17): the configs of an ingest host's BIRD (its announce table
//! learned and exported over BGP with BFD) and of the upstream router's (every host's route
//! merged into one ECMP route), and the router's next hops as the kernel shows them. Used by
//! `nsfail lab cluster` and by the anycast tests.

use std::{net::IpAddr, path::Path};

use super::{Result, cmd};

/// The AS of the upstream router, and the one AS every ingest host shares (so that the router
/// merges their paths).
const ROUTER_AS: u32 = 65000;
const HOST_AS: u32 = 65001;

/// The BGP session's timers: quick to reconnect after BFD took it down (BIRD waits about a
/// minute otherwise).
const SESSION: &str = "    bfd on;
    hold time 3;
    connect delay time 1;
    connect retry time 1;
    error wait time 1, 2;
";

/// An ingest host's BIRD: the routes other programs made in kernel table `table` learned and
/// exported to the router (`router`, from `me`) over BGP with BFD (`bfd`: the options of BIRD's
/// `interface` block), nothing imported. Logs everything to `log`.
pub fn host_conf(log: &Path, me: &str, router: &str, table: u32, bfd: &str) -> String {
    format!(
        r#"log "{log}" all;
router id {me};
protocol device {{ scan time 1; }}
protocol kernel announce {{
    kernel table {table};
    learn;
    scan time 1;
    ipv4 {{ import all; export none; }};
}}
protocol bfd {{ interface "*" {{ {bfd} }}; }}
protocol bgp up {{
    local {me} as {HOST_AS};
    neighbor {router} as {ROUTER_AS};
{SESSION}    ipv4 {{ import none; export where proto = "announce"; next hop self; }};
}}
"#,
        log = log.display()
    )
}

/// The router's BIRD: every host's routes imported and merged into one multipath kernel route
/// (ECMP). `hosts`: the router's address on each host's link and the host's address.
pub fn router_conf(log: &Path, hosts: &[(&str, &str)], bfd: &str) -> String {
    let mut conf = format!(
        r#"log "{log}" all;
router id {router_id};
protocol device {{ scan time 1; }}
protocol kernel {{
    merge paths on;
    ipv4 {{ import none; export all; }};
}}
protocol bfd {{ interface "*" {{ {bfd} }}; }}
"#,
        log = log.display(),
        router_id = hosts.first().map_or("10.0.0.1", |h| h.0),
    );
    for (i, (local, host)) in hosts.iter().enumerate() {
        conf += &format!(
            r#"protocol bgp h{i} {{
    local {local} as {ROUTER_AS};
    neighbor {host} as {HOST_AS};
{SESSION}    ipv4 {{ import all; export none; }};
}}
"#
        );
    }
    conf
}

/// The next hops of the route to `addr` in namespace `ns` (`ip route show`), sorted.
pub fn next_hops(ns: &str, addr: &str) -> Result<Vec<IpAddr>> {
    let out = cmd("ip", &["-n", ns, "route", "show", addr])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut hops: Vec<IpAddr> = words
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    hops.sort();
    hops.dedup();
    Ok(hops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_their_peers_and_table() {
        let host = host_conf(Path::new("/l/h.log"), "10.0.1.2", "10.0.1.1", 2345, "");
        assert!(host.contains("kernel table 2345;"), "{host}");
        assert!(host.contains("neighbor 10.0.1.1 as 65000;"), "{host}");
        let router = router_conf(
            Path::new("/l/r.log"),
            &[("10.0.1.1", "10.0.1.2"), ("10.0.2.1", "10.0.2.2")],
            "",
        );
        assert!(router.contains("merge paths on;"), "{router}");
        assert!(router.contains("protocol bgp h1 {"), "{router}");
        assert!(router.contains("neighbor 10.0.2.2 as 65001;"), "{router}");
    }
}
