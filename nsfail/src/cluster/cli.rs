//! `nsfail apply --config FILE` and `nsfail cluster status --config FILE`: the CLI talks to
//! etcd itself, with the file's `[cluster]` section; no daemon is involved (every daemon of the
//! cluster watches etcd and applies what changed).

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::*;

fn cluster_of(path: &Path) -> Result<(config::Config, Cluster)> {
    let cfg = config::Config::load(path)?;
    let Some(cluster) = cfg.cluster.clone() else {
        bail!(
            "{}: no [cluster] section: channels of a single host are changed through its daemon (nsfail add/remove channel, reload)",
            path.display()
        );
    };
    Ok((cfg, cluster))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Writes the file's channels (and nothing else) to the cluster's etcd.
pub fn apply(path: &Path, prune: bool, json: bool) -> Result<()> {
    let (cfg, cluster) = cluster_of(path)?;
    let report = runtime()?.block_on(async {
        let mut client = store::connect(&cluster).await?;
        store::apply(&mut client, &cluster, &cfg.channels, prune).await
    })?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "cluster {}: {} channels written, {} unchanged, {} removed",
            cluster.name,
            report.written.len(),
            report.unchanged.len(),
            report.removed.len()
        );
    }
    Ok(())
}

/// Prints the cluster's hosts (with the time left on their leases) and etcd's health; an
/// unreachable etcd is an error (exit 1) after the status says so.
pub fn status(path: &Path, json: bool) -> Result<()> {
    let (_, cluster) = cluster_of(path)?;
    let st = runtime()?.block_on(store::status(&cluster));
    if json {
        println!("{}", serde_json::to_string(&st)?);
    } else {
        let etcd = match (&st.etcd.version, &st.etcd.error) {
            (Some(v), _) => format!("healthy (etcd {v})"),
            (None, Some(e)) => format!("UNREACHABLE: {e}"),
            (None, None) => "unknown".into(),
        };
        println!(
            "cluster {}  etcd {}: {etcd}",
            st.name,
            st.etcd.endpoints.join(",")
        );
        println!(
            "{} channels ({} with an active encoder from a leader, {} SRT callers); leader: {}",
            st.channels,
            st.actives,
            st.srt_callers,
            st.leader.as_deref().unwrap_or("none")
        );
        if !st.drained.is_empty() {
            println!("drained encoders: {}", st.drained.join(", "));
        }
        println!(
            "{:<24} {:>8} {:>8} {:>8}  ENCODERS",
            "HOST", "PID", "LEASE_S", "TTL_S"
        );
        for h in &st.hosts {
            let encoders: Vec<String> = h
                .encoders
                .iter()
                .map(|(n, ok)| format!("{n}({})", if *ok { "up" } else { "down" }))
                .collect();
            println!(
                "{:<24} {:>8} {:>8} {:>8}  {}",
                h.host,
                h.pid,
                h.lease_s,
                h.ttl_s.map_or("-".into(), |t| t.to_string()),
                encoders.join(" ")
            );
        }
        for key in &st.bad_keys {
            println!("bad key (skipped): {key}");
        }
    }
    if !st.etcd.healthy {
        bail!("etcd unreachable");
    }
    Ok(())
}
