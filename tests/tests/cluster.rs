//! A cluster host on a real etcd (issue 17): Debian's etcd in a namespace of the test's own,
//! the real daemon in a lab's ingest namespace. Without `[cluster]` nothing here runs.

use std::{
    fs,
    net::SocketAddr,
    time::{Duration, Instant},
};

use nsfail_tests::{
    PinDir,
    cluster::{Etcd, cluster_section, log_of, without_channels, xdp_attached},
    daemon::{Daemon, Policy, TempDir, cli, events, lab_config_with, status},
    lab,
    traffic::{Echo, Receiver, send_burst},
    unique, wait_for,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The channel names in `status --json`, with their active encoders.
fn channels(socket: &std::path::Path) -> Vec<(String, String)> {
    status(socket)["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["active"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn has_event(socket: &std::path::Path, needle: &str) -> bool {
    events(socket)
        .iter()
        .any(|e| e["reason"].as_str().unwrap_or("").contains(needle))
}

/// One host: it waits for etcd at its first start with nothing attached, takes its channels
/// from etcd, registers its encoders and their health, applies `add/remove channel` through
/// etcd, skips and reports corrupt and foreign keys, and fails a channel over when another
/// host's encoder is reported down or its host's lease expires.
#[test]
fn a_cluster_host_follows_etcd() {
    let lab = lab(2);
    let _echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&format!("{}:9000", e.addr4))))
        .collect();
    let mut etcd = Etcd::new();
    let endpoint = etcd.link(&lab.rt.name, 1);
    let name = unique("c");
    let prefix = format!("/nsfail/{name}/");
    let dir = TempDir::new();
    let full = lab_config_with(&lab, &Policy::tolerant());
    let host_cfg = dir.path.join("h1.toml");
    fs::write(
        &host_cfg,
        without_channels(&full) + &cluster_section(&name, "h1", &endpoint),
    )
    .unwrap();
    let seed = dir.path.join("seed.toml");
    fs::write(
        &seed,
        full.clone() + &cluster_section(&name, "seed", "http://127.0.0.1:2379"),
    )
    .unwrap();
    let socket = dir.path.join("nsfail.sock");
    let pins = PinDir::new();

    // etcd is not running: the daemon waits, says so, and attaches nothing.
    let mut daemon = Daemon::spawn(&host_cfg, &socket, &pins);
    let waiting = wait_for(Duration::from_secs(10), || {
        log_of(&host_cfg).contains("waiting for etcd").then_some(())
    });
    assert!(
        waiting.is_some(),
        "no word of the wait:\n{}",
        log_of(&host_cfg)
    );
    assert!(
        matches!(daemon.child.child.try_wait(), Ok(None)),
        "the daemon waits rather than exits"
    );
    assert!(
        !xdp_attached(&lab.rt.name, "ing"),
        "nothing attached while waiting"
    );
    assert!(
        cli(&socket, &["status"]).code != 0,
        "no socket while waiting"
    );

    // etcd starts; the channels are seeded with `nsfail apply`; the host takes them.
    etcd.start();
    let applied = etcd.nsfail(&["apply", "--config", seed.to_str().unwrap(), "--json"]);
    assert_eq!(applied.code, 0, "apply: {}", applied.stderr);
    let report: serde_json::Value = serde_json::from_str(&applied.stdout).unwrap();
    assert_eq!(report["written"], serde_json::json!(["cam1", "cam2"]));
    daemon.wait_up(&host_cfg);
    let both = wait_for(Duration::from_secs(10), || {
        let ch = channels(&socket);
        (ch.len() == 2).then_some(ch)
    });
    assert_eq!(
        both,
        Some(vec![
            ("cam1".to_owned(), "enc-a".to_owned()),
            ("cam2".to_owned(), "enc-a".to_owned())
        ]),
        "{}",
        log_of(&host_cfg)
    );
    assert!(xdp_attached(&lab.rt.name, "ing"));
    // The data plane forwards what etcd defined: cam2's stream reaches enc-a.
    let ea = &lab.encoders[0];
    let rx = Receiver::start(&ea.ns, sa(&format!("{}:7002", ea.addr4)));
    send_burst(
        &lab.src,
        sa("10.77.0.2:41000"),
        sa("10.77.0.1:5002"),
        0..50,
        Duration::from_millis(2),
        Duration::from_secs(2),
    );
    assert_eq!(rx.seen().len(), 50, "cam2 from etcd forwards to enc-a");

    // Its encoders are registered under its lease, their health published.
    let up = wait_for(Duration::from_secs(5), || {
        let st = etcd.nsfail(&[
            "cluster",
            "status",
            "--config",
            seed.to_str().unwrap(),
            "--json",
        ]);
        let st: serde_json::Value = serde_json::from_str(&st.stdout).ok()?;
        let h1 = st["hosts"]
            .as_array()?
            .iter()
            .find(|h| h["host"] == "h1")?
            .clone();
        (h1["encoders"] == serde_json::json!([["enc-a", true], ["enc-b", true]])).then_some(h1)
    });
    assert!(
        up.is_some(),
        "h1 and its healthy encoders in cluster status: {}\n{}",
        etcd.nsfail(&["cluster", "status", "--config", seed.to_str().unwrap()])
            .stdout,
        log_of(&host_cfg)
    );
    let st = status(&socket);
    assert_eq!(
        st["encoders"][0]["host"], "h1",
        "status names each encoder's host"
    );

    // add channel / remove channel go through etcd, answered once applied here.
    let t = Instant::now();
    let added = cli(
        &socket,
        &[
            "add",
            "channel",
            "cam3",
            "--listen",
            "10.77.0.1:5004",
            "--encoders",
            "enc-b,enc-a",
        ],
    );
    let add_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(added.code, 0, "add channel: {}", added.stderr);
    assert!(
        etcd.get(&format!("{prefix}channels/cam3")).is_some(),
        "cam3 is in etcd"
    );
    assert!(channels(&socket).contains(&("cam3".into(), "enc-b".into())));
    let t = Instant::now();
    let removed = cli(&socket, &["remove", "channel", "cam2"]);
    let remove_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(removed.code, 0, "remove channel: {}", removed.stderr);
    assert!(etcd.get(&format!("{prefix}channels/cam2")).is_none());
    assert!(!channels(&socket).iter().any(|(n, _)| n == "cam2"));
    println!(
        "add channel through etcd: {add_ms:.1} ms; remove: {remove_ms:.1} ms (CLI round trip)"
    );

    // A channel written to etcd by someone else reaches the maps through the watch.
    let cam5 = br#"{"name":"cam5","listen":"10.77.0.1:5006","encoders":["enc-a"]}"#;
    let t = Instant::now();
    etcd.put(&format!("{prefix}channels/cam5"), cam5, None);
    let seen = wait_for(Duration::from_secs(5), || {
        channels(&socket)
            .iter()
            .any(|(n, _)| n == "cam5")
            .then(|| t.elapsed())
    });
    let seen = seen.expect("cam5 applied from the watch");
    println!(
        "a put in etcd visible in status after {:.1} ms (20 ms polls)",
        seen.as_secs_f64() * 1000.0
    );

    // Corrupt and foreign keys: reported and skipped; everything else stays.
    etcd.put(&format!("{prefix}channels/cam9"), b"{not json", None);
    etcd.put(&format!("{prefix}junk/x"), b"1", None);
    let bad = br#"{"name":"cam8","listen":"10.77.0.1:5000","encoders":["enc-a"]}"#;
    etcd.put(&format!("{prefix}channels/cam8"), bad, None);
    let reported = wait_for(Duration::from_secs(5), || {
        (has_event(&socket, "skipped /nsfail/")
            && has_event(&socket, "junk/x")
            && has_event(&socket, "skipped channel cam8"))
        .then_some(())
    });
    assert!(reported.is_some(), "skips reported: {:?}", events(&socket));
    let now: Vec<String> = channels(&socket).into_iter().map(|(n, _)| n).collect();
    assert_eq!(now, ["cam1", "cam3", "cam5"], "nothing bad applied");

    // Another host's encoder, under that host's lease: healthy, then reported down.
    let mac = "02:00:00:00:00:02";
    let h2 = format!(r#"{{"host":"h2","lease":0,"lease_s":1,"pid":1,"mac":"{mac}"}}"#);
    etcd.put(&format!("{prefix}hosts/h2"), h2.as_bytes(), None);
    let remote = |healthy: bool| {
        format!(
            r#"{{"host":"h2","definition":{{"name":"enc-r","address":"10.77.9.2","health":{}}},"healthy":{healthy},"drained":false}}"#,
            r#"{"kind":"udp","port":9000}"#
        )
    };
    etcd.put(
        &format!("{prefix}encoders/h2/enc-r"),
        remote(true).as_bytes(),
        None,
    );
    let added = cli(
        &socket,
        &[
            "add",
            "channel",
            "cam4",
            "--listen",
            "10.77.0.1:5008",
            "--encoders",
            "enc-r,enc-a",
        ],
    );
    assert_eq!(
        added.code, 0,
        "add channel on a remote encoder: {}",
        added.stderr
    );
    assert!(channels(&socket).contains(&("cam4".into(), "enc-r".into())));
    let st = status(&socket);
    let enc_r = st["encoders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "enc-r")
        .unwrap()
        .clone();
    assert_eq!(
        (enc_r["host"].as_str(), enc_r["local"].as_bool()),
        (Some("h2"), Some(false))
    );
    etcd.put(
        &format!("{prefix}encoders/h2/enc-r"),
        remote(false).as_bytes(),
        None,
    );
    let moved = wait_for(Duration::from_secs(5), || {
        channels(&socket)
            .contains(&("cam4".into(), "enc-a".into()))
            .then_some(())
    });
    assert!(
        moved.is_some(),
        "cam4 fails over when h2 reports enc-r down"
    );

    // Back up, on a lease h2 never keeps alive: when it expires, enc-r is down again.
    etcd.put(
        &format!("{prefix}encoders/h2/enc-r"),
        remote(true).as_bytes(),
        Some(1),
    );
    let healthy = wait_for(Duration::from_secs(5), || {
        let st = status(&socket);
        let e = st["encoders"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == "enc-r")?
            .clone();
        (e["healthy"] == true).then_some(())
    });
    assert!(healthy.is_some(), "enc-r healthy again");
    assert_eq!(cli(&socket, &["remap", "cam4", "enc-r"]).code, 0);
    let t = Instant::now();
    let expired = wait_for(Duration::from_secs(6), || {
        channels(&socket)
            .contains(&("cam4".into(), "enc-a".into()))
            .then(|| t.elapsed())
    });
    let expired = expired.expect("cam4 leaves enc-r when h2's lease expires");
    // h1, the only host, leads: it wrote its decision for every host to follow.
    let written = wait_for(Duration::from_secs(2), || {
        let v = etcd.get(&format!("{prefix}active/cam4"))?;
        let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
        (v["encoder"] == "enc-a" && v["leader"] == "h1").then_some(())
    });
    assert!(written.is_some(), "the leader's choice for cam4 in etcd");
    assert_eq!(status(&socket)["cluster"]["leader"], "h1");
    assert!(etcd.get(&format!("{prefix}encoders/h2/enc-r")).is_none());
    println!(
        "h2's 1 s lease expired: cam4 off enc-r after {:.2} s",
        expired.as_secs_f64()
    );
    assert!(has_event(&socket, "encoder unhealthy"));

    // A restart is refused when another host holds one of this host's encoder names.
    assert_eq!(daemon.stop(), Some(0), "clean stop:\n{}", log_of(&host_cfg));
    let taken = br#"{"host":"h9","definition":{"name":"enc-b","address":"10.77.2.2","health":{"kind":"udp","port":9000}},"healthy":true,"drained":false}"#;
    etcd.put(&format!("{prefix}encoders/h9/enc-b"), taken, None);
    let mut again = Daemon::spawn(&host_cfg, &socket, &pins);
    let code = wait_for(Duration::from_secs(10), || {
        again
            .child
            .child
            .try_wait()
            .ok()
            .flatten()
            .and_then(|s| s.code())
    });
    assert_eq!(code, Some(1), "refused:\n{}", log_of(&host_cfg));
    let log = log_of(&host_cfg);
    assert!(
        log.contains("encoder enc-b of this host (h1) is already registered")
            && log.contains("by host h9"),
        "{log}"
    );
    drop(again);
    drop(daemon);
}
