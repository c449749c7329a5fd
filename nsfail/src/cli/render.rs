//! Human-readable output: the status tables and one line per event (`--json` prints the
//! protocol's own values instead).

use super::*;

pub(super) fn render_event(e: &Event) -> String {
    format!(
        "{}  {:<10} {:<10} -> {:<10} {}",
        e.time,
        e.channel.as_deref().unwrap_or("-"),
        e.from.as_deref().unwrap_or("-"),
        e.to.as_deref().unwrap_or("-"),
        e.reason
    )
}

pub(super) fn render_status(s: &Status, brief: bool) -> String {
    let mut out = String::new();
    if let Some(c) = &s.cluster {
        out += &format!(
            "cluster {}  host {}{}{}  leader {}  etcd {}\n\n",
            c.name,
            c.host,
            if c.leading { " (leader)" } else { "" },
            if c.drained {
                " DRAINED (routes withdrawn)"
            } else {
                ""
            },
            c.leader.as_deref().unwrap_or("none"),
            if c.etcd {
                "reachable"
            } else {
                "UNREACHABLE (last state kept)"
            }
        );
    }
    // A cluster host's status names each encoder's host; one host's stays as it was.
    let clustered = s.cluster.is_some();
    let host_col = |h: &str| {
        if clustered {
            format!("{h:<16} ")
        } else {
            String::new()
        }
    };
    if brief {
        out += &format!(
            "{:<12} {:<24} {:<10} ENCODERS\n",
            "CHANNEL", "LISTEN", "ACTIVE"
        );
        for c in &s.channels {
            out += &format!(
                "{:<12} {:<24} {:<10} {}\n",
                c.name,
                c.listen.to_string(),
                c.active.as_deref().unwrap_or("-"),
                c.encoders.join(",")
            );
        }
        out += &format!(
            "\n{:<12} {}{:<26} {:<7} {:<8} {:<7}\n",
            "ENCODER",
            host_col("HOST"),
            "ADDRESS",
            "LOCAL",
            "HEALTHY",
            "DRAINED"
        );
        for e in &s.encoders {
            out += &format!(
                "{:<12} {}{:<26} {:<7} {:<8} {:<7}\n",
                e.name,
                host_col(e.host.as_deref().unwrap_or("-")),
                e.address,
                e.local,
                e.healthy,
                e.drained
            );
        }
        return out;
    }
    out += &format!(
        "{:<12} {:<24} {:<10} {:>10} {:>12} {:>9}  {}\n",
        "CHANNEL", "LISTEN", "ACTIVE", "PACKETS", "BYTES", "IDLE_MS", "ENCODERS"
    );
    for c in &s.channels {
        out += &format!(
            "{:<12} {:<24} {:<10} {:>10} {:>12} {:>9}  {}\n",
            c.name,
            c.listen.to_string(),
            c.active.as_deref().unwrap_or("-"),
            c.packets,
            c.bytes,
            c.idle_ms.map_or("-".into(), |v| v.to_string()),
            c.encoders.join(",")
        );
    }
    out += &format!(
        "\n{:<12} {}{:<26} {:<8} {:<8} {:>10} {:>10} {:>7}  {}\n",
        "ENCODER",
        host_col("HOST"),
        "ADDRESS",
        "HEALTHY",
        "DRAINED",
        "PACKETS",
        "REPLIES",
        "DROPS",
        "ACTIVE_FOR"
    );
    for e in &s.encoders {
        out += &format!(
            "{:<12} {}{:<26} {:<8} {:<8} {:>10} {:>10} {:>7}  {}\n",
            e.name,
            host_col(e.host.as_deref().unwrap_or("-")),
            e.address,
            e.healthy,
            e.drained,
            e.packets,
            e.replies,
            e.drops,
            e.active_for.join(",")
        );
    }
    out
}
