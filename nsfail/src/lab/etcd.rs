//! Debian's etcd (package `etcd-server`, 3.4) for cluster labs (issue 17): one member, its
//! client port on every address of its namespace, timed for the 1 s leases the labs use.

use std::path::Path;

/// etcd's client port.
pub const PORT: u16 = 2379;

/// The command line of a one-member etcd keeping its data in `data`. A 50 ms heartbeat and a
/// 500 ms election timeout: etcd grants no lease shorter than 1.5 times the election timeout,
/// and the labs' hosts hold 1 s leases.
pub fn command(data: &Path) -> Vec<String> {
    let peer = "http://127.0.0.1:2380";
    [
        "etcd",
        "--name",
        "lab",
        "--data-dir",
        &data.display().to_string(),
        "--listen-client-urls",
        &format!("http://0.0.0.0:{PORT}"),
        "--advertise-client-urls",
        &format!("http://127.0.0.1:{PORT}"),
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        &format!("lab={peer}"),
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
    ]
    .map(str::to_owned)
    .to_vec()
}
