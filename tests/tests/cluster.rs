//! A cluster host on a real etcd (issue 17): Debian's etcd in a namespace of the test's own,
//! the real daemon in a lab's ingest namespace. Without `[cluster]` nothing here runs.

use std::{
    fs,
    net::SocketAddr,
    time::{Duration, Instant},
};

use nsfail_tests::{
    PinDir,
    cluster::{
        Etcd, ROUTED_INGEST, RoutedCluster, cluster_of, cluster_section, log_of, routed_cluster,
        two_hosts::{active_in_etcd, two_host_seed, two_hosts, two_hosts_leased},
        without_channels, xdp_attached,
    },
    daemon::{
        Daemon, Policy, TempDir, cli, count_events, events, is_on, lab_config_with, placed_within,
        placement, status,
    },
    lab,
    traffic::{Echo, Receiver, send_burst},
    unique, wait_for,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `ip route show table TABLE` in namespace `ns`.
fn routes_in(ns: &str, table: u32) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "route", "show", "table", &table.to_string()])
        .output()
        .expect("ip route show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts a receiver on `port` of encoder `enc`, sends `n` numbered packets (2 ms apart) from
/// `from` in the lab's source namespace to the ingest endpoint `to`, and gives the receiver
/// back, to be read at once (`seen`) or once the stream has ended (`settled`).
fn burst_to(
    lab: &nsfail::lab::Lab,
    enc: &nsfail::lab::EncoderNs,
    port: u16,
    from: &str,
    to: &str,
    n: u32,
) -> Receiver {
    let rx = Receiver::start(&enc.ns, sa(&format!("{}:{port}", enc.addr4)));
    send_burst(
        &lab.src,
        sa(from),
        sa(to),
        0..n,
        Duration::from_millis(2),
        Duration::from_secs(2),
    );
    rx
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
    // The host's file keeps its channels: they are not used (and the daemon says so).
    fs::write(
        &host_cfg,
        full.clone() + &cluster_section(&name, "h1", &endpoint) + "announce_table = 2345\n",
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
        let ch = placement(&socket);
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
    // Anycast: the ingest address is announced in the cluster's table.
    let announced = wait_for(Duration::from_secs(3), || {
        routes_in(&lab.rt.name, 2345)
            .contains("10.77.0.1 dev ing proto 247")
            .then_some(())
    });
    assert!(announced.is_some(), "{}", routes_in(&lab.rt.name, 2345));
    // The data plane forwards what etcd defined: cam2's stream reaches enc-a.
    let ea = &lab.encoders[0];
    let rx = burst_to(&lab, ea, 7002, "10.77.0.2:41000", "10.77.0.1:5002", 50);
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
        // The leader (h1) wrote both channels' active encoders.
        (h1["encoders"] == serde_json::json!([["enc-a", true], ["enc-b", true]])
            && st["actives"] == 2)
            .then_some(h1)
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
    assert!(is_on(&socket, "cam3", "enc-b"));
    // Refused before anything is written: an encoder nobody has, a name already taken.
    let unknown = cli(
        &socket,
        &[
            "add",
            "channel",
            "cam7",
            "--listen",
            "10.77.0.1:5010",
            "--encoders",
            "enc-x",
        ],
    );
    assert_eq!(unknown.code, 1, "{}", unknown.stdout);
    assert!(unknown.stderr.contains("enc-x"), "{}", unknown.stderr);
    assert!(etcd.get(&format!("{prefix}channels/cam7")).is_none());
    let taken = cli(
        &socket,
        &[
            "add",
            "channel",
            "cam1",
            "--listen",
            "10.77.0.1:5012",
            "--encoders",
            "enc-a",
        ],
    );
    assert_eq!(taken.code, 1);
    assert!(taken.stderr.contains("already exists"), "{}", taken.stderr);
    let chosen = wait_for(Duration::from_secs(3), || {
        active_in_etcd(&etcd, &prefix, "cam2")
    });
    assert_eq!(
        chosen,
        Some(("enc-a".into(), "h1".into())),
        "h1 leads and wrote cam2's choice"
    );
    let t = Instant::now();
    let removed = cli(&socket, &["remove", "channel", "cam2"]);
    let remove_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(removed.code, 0, "remove channel: {}", removed.stderr);
    assert!(etcd.get(&format!("{prefix}channels/cam2")).is_none());
    assert!(
        etcd.get(&format!("{prefix}active/cam2")).is_none(),
        "its active encoder goes with it"
    );
    assert!(has_event(
        &socket,
        "the config file's 2 channels are not used"
    ));
    assert!(!placement(&socket).iter().any(|(n, _)| n == "cam2"));
    println!(
        "add channel through etcd: {add_ms:.1} ms; remove: {remove_ms:.1} ms (CLI round trip)"
    );

    // A channel written to etcd by someone else reaches the maps through the watch.
    let cam5 = br#"{"name":"cam5","listen":"10.77.0.1:5006","encoders":["enc-a"]}"#;
    let t = Instant::now();
    etcd.put(&format!("{prefix}channels/cam5"), cam5, None);
    let seen = wait_for(Duration::from_secs(5), || {
        placement(&socket)
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
    let now: Vec<String> = placement(&socket).into_iter().map(|(n, _)| n).collect();
    assert_eq!(now, ["cam1", "cam3", "cam5"], "nothing bad applied");
    // cam8 is skipped here but its key exists: adding that name again is refused by etcd's
    // transaction, not written over.
    let over = cli(
        &socket,
        &[
            "add",
            "channel",
            "cam8",
            "--listen",
            "10.77.0.1:5014",
            "--encoders",
            "enc-a",
        ],
    );
    assert_eq!(over.code, 1);
    assert!(
        over.stderr.contains("already exists in the cluster"),
        "{}",
        over.stderr
    );

    // SIGHUP: the file is reloaded, the cluster's channels stay, and a changed definition of
    // this host's encoder is published.
    let text = fs::read_to_string(&host_cfg).unwrap();
    let at = text.rfind("fall = 5").expect("enc-b's tolerant check");
    fs::write(
        &host_cfg,
        format!("{}fall = 6{}", &text[..at], &text[at + 8..]),
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let republished = wait_for(Duration::from_secs(5), || {
        let v = etcd.get(&format!("{prefix}encoders/h1/enc-b"))?;
        let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
        (v["definition"]["health"]["fall"] == 6).then_some(())
    });
    assert!(republished.is_some(), "enc-b's new definition in etcd");
    assert!(has_event(&socket, "config reloaded"));
    let now: Vec<String> = placement(&socket).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        now,
        ["cam1", "cam3", "cam5"],
        "a reload keeps the cluster's channels"
    );

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
    // add channel is checked against what this host has applied: enc-r first.
    let known = wait_for(Duration::from_secs(5), || {
        let st = status(&socket);
        st["encoders"]
            .as_array()?
            .iter()
            .any(|e| e["name"] == "enc-r")
            .then_some(())
    });
    assert!(known.is_some(), "enc-r of h2 applied here");
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
    assert!(is_on(&socket, "cam4", "enc-r"));
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
    assert!(
        !log_of(&host_cfg).contains("enc-r: no route"),
        "no egress policy here for another host's encoder"
    );
    etcd.put(
        &format!("{prefix}encoders/h2/enc-r"),
        remote(false).as_bytes(),
        None,
    );
    let moved = placed_within(&socket, "cam4", "enc-a", Duration::from_secs(5));
    assert!(moved, "cam4 fails over when h2 reports enc-r down");

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
        is_on(&socket, "cam4", "enc-a").then(|| t.elapsed())
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
    let human = cli(&socket, &["status"]).stdout;
    assert!(
        human.contains("host h1 (leader)  leader h1  etcd reachable") && human.contains(" HOST "),
        "{human}"
    );
    let enc_r_line = human
        .lines()
        .find(|l| l.starts_with("enc-r"))
        .unwrap_or_default();
    assert!(enc_r_line.contains(" h2 "), "enc-r's host: {human}");
    assert!(etcd.get(&format!("{prefix}encoders/h2/enc-r")).is_none());
    println!(
        "h2's 1 s lease expired: cam4 off enc-r after {:.2} s",
        expired.as_secs_f64()
    );
    assert!(has_event(&socket, "encoder unhealthy"));

    // A second ingest address comes with a channel and goes with it.
    let cam6 = br#"{"name":"cam6","listen":"10.77.0.9:5000","encoders":["enc-a"]}"#;
    etcd.put(&format!("{prefix}channels/cam6"), cam6, None);
    let added = wait_for(Duration::from_secs(3), || {
        routes_in(&lab.rt.name, 2345)
            .contains("10.77.0.9 dev ing proto 247")
            .then_some(())
    });
    assert!(added.is_some(), "{}", routes_in(&lab.rt.name, 2345));
    // `nsfail apply` of a file whose channel would sit on cam6's address (cam6 is not in the
    // file) is refused, naming the collision, and writes nothing.
    let clash = dir.path.join("clash.toml");
    fs::write(
        &clash,
        fs::read_to_string(&seed)
            .unwrap()
            .replace("10.77.0.1:5002", "10.77.0.9:5000"),
    )
    .unwrap();
    let refused = etcd.nsfail(&["apply", "--config", clash.to_str().unwrap()]);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains("cam2 on 10.77.0.9:5000 (etcd's channel cam6 is there)"),
        "{}",
        refused.stderr
    );
    assert!(etcd.get(&format!("{prefix}channels/cam2")).is_none());
    // A channel put on cam6's address is skipped (a channel added on its own is checked as
    // the whole composition checks it), and applied once cam6 is gone.
    let cam11 = br#"{"name":"cam11","listen":"10.77.0.9:5000","encoders":["enc-b"]}"#;
    etcd.put(&format!("{prefix}channels/cam11"), cam11, None);
    let skipped = wait_for(Duration::from_secs(5), || {
        has_event(&socket, "skipped channel cam11").then_some(())
    });
    assert!(skipped.is_some(), "cam11 skipped: {:?}", events(&socket));
    assert!(!placement(&socket).iter().any(|(n, _)| n == "cam11"));
    // Another change makes the host compose etcd's state whole again: the running cam6
    // keeps its address ("cam11" sorts first, and used to take it over).
    assert_eq!(cli(&socket, &["remove", "channel", "cam5"]).code, 0);
    let now = placement(&socket);
    assert!(
        now.contains(&("cam6".into(), "enc-a".into())) && !now.iter().any(|(n, _)| n == "cam11"),
        "{now:?}"
    );
    // A restarted host composes etcd's state from nothing and makes the same choice: the
    // definition written first keeps the address.
    assert_eq!(daemon.stop(), Some(0), "clean stop:\n{}", log_of(&host_cfg));
    daemon = Daemon::start(&host_cfg, &socket, &pins);
    let now = wait_for(Duration::from_secs(10), || {
        let p = placement(&socket);
        p.iter().any(|(n, _)| n == "cam6").then_some(p)
    })
    .unwrap_or_else(|| panic!("cam6 after a restart: {:?}", placement(&socket)));
    assert!(!now.iter().any(|(n, _)| n == "cam11"), "{now:?}");
    assert_eq!(cli(&socket, &["remove", "channel", "cam6"]).code, 0);
    let taken_over = placed_within(&socket, "cam11", "enc-b", Duration::from_secs(5));
    assert!(
        taken_over,
        "cam11 applied once cam6 left its address: {:?}",
        placement(&socket)
    );
    assert!(
        routes_in(&lab.rt.name, 2345).contains("10.77.0.9 dev ing proto 247"),
        "10.77.0.9 stays announced for cam11"
    );
    // cam11 changed onto cam1's address: neither running stream is disturbed. cam11 runs
    // on with its running definition, and the change is reported.
    let onto_cam1 = br#"{"name":"cam11","listen":"10.77.0.1:5000","encoders":["enc-b"]}"#;
    etcd.put(&format!("{prefix}channels/cam11"), onto_cam1, None);
    let refused = wait_for(Duration::from_secs(5), || {
        has_event(
            &socket,
            "skipped channel cam11: its new definition in etcd is not applied",
        )
        .then_some(())
    });
    assert!(refused.is_some(), "{:#?}", events(&socket));
    let now = placement(&socket);
    assert!(
        now.contains(&("cam11".into(), "enc-b".into())) && now.iter().any(|(n, _)| n == "cam1"),
        "{now:?}"
    );
    let listen = |name: &str| {
        status(&socket)["channels"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name).cloned())
            .map(|c| c["listen"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(listen("cam11").as_deref(), Some("10.77.0.9:5000"));
    assert_eq!(listen("cam1").as_deref(), Some("10.77.0.1:5000"));
    assert!(routes_in(&lab.rt.name, 2345).contains("10.77.0.9 dev ing proto 247"));
    assert_eq!(cli(&socket, &["remove", "channel", "cam11"]).code, 0);
    let withdrawn = wait_for(Duration::from_secs(3), || {
        (!routes_in(&lab.rt.name, 2345).contains("10.77.0.9")).then_some(())
    });
    assert!(withdrawn.is_some(), "{}", routes_in(&lab.rt.name, 2345));
    assert!(has_event(
        &socket,
        "cluster: withdrew 10.77.0.9 (table 2345)"
    ));

    // A restart is refused when another host holds one of this host's encoder names.
    assert_eq!(daemon.stop(), Some(0), "clean stop:\n{}", log_of(&host_cfg));
    assert!(
        routes_in(&lab.rt.name, 2345).contains("10.77.0.1 dev ing proto 247"),
        "a stopped daemon leaves its announcement (the data plane keeps forwarding)"
    );
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

/// Two hosts, each in its own lab with its own two encoders: one leads, the other follows
/// the leader's choices into its maps; a follower's remap is refused; when the leader dies a
/// new one is elected within its lease and fails its encoders' channels over; while etcd is
/// down the survivor steps down, keeps forwarding and fails over between its own encoders,
/// and leads again when etcd returns.
#[test]
fn two_hosts_follow_one_leader() {
    let (lab1, lab2) = (lab(2), lab(2));
    let mut echoes1: Vec<Echo> = lab1
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&format!("{}:9000", e.addr4))))
        .collect();
    let mut echoes2: Vec<Echo> = lab2
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&format!("{}:9000", e.addr4))))
        .collect();
    let mut etcd = Etcd::new();
    let (ep1, ep2) = (etcd.link(&lab1.rt.name, 1), etcd.link(&lab2.rt.name, 2));
    etcd.start();
    let name = unique("c");
    let prefix = format!("/nsfail/{name}/");
    let dir = TempDir::new();
    let seed = dir.path.join("seed.toml");
    etcd.seed(&seed, &two_host_seed(&name));

    let cfg1 = dir.path.join("h1.toml");
    fs::write(
        &cfg1,
        without_channels(&lab_config_with(&lab1, &Policy::tolerant()))
            + &cluster_section(&name, "h1", &ep1),
    )
    .unwrap();
    let cfg2 = dir.path.join("h2.toml");
    fs::write(
        &cfg2,
        without_channels(&lab_config_with(&lab2, &Policy::tolerant()))
            .replace("\"enc-a\"", "\"enc-c\"")
            .replace("\"enc-b\"", "\"enc-d\"")
            + &cluster_section(&name, "h2", &ep2),
    )
    .unwrap();
    let (pins1, pins2) = (PinDir::new(), PinDir::new());
    let (sock1, sock2) = (dir.path.join("h1.sock"), dir.path.join("h2.sock"));
    let h1 = Daemon::start(&cfg1, &sock1, &pins1);
    let led = wait_for(Duration::from_secs(5), || {
        (cluster_of(&sock1)["leading"] == true).then_some(())
    });
    assert!(led.is_some(), "h1 leads:\n{}", log_of(&cfg1));
    let mut h2 = Daemon::start(&cfg2, &sock2, &pins2);
    let follows = wait_for(Duration::from_secs(5), || {
        let ch = placement(&sock2);
        (cluster_of(&sock2)["leader"] == "h1"
            && ch
                == [
                    ("cam1".into(), "enc-a".into()),
                    ("cam2".into(), "enc-c".into()),
                ])
        .then_some(())
    });
    assert!(
        follows.is_some(),
        "h2 follows h1: {:?}\n{}",
        placement(&sock2),
        log_of(&cfg2)
    );
    assert_eq!(cluster_of(&sock2)["leading"], false);
    // `cluster status`: etcd's health, the leader, both hosts with their leases and encoders.
    let seed_path = seed.to_str().unwrap();
    let cs = wait_for(Duration::from_secs(3), || {
        let out = etcd.nsfail(&["cluster", "status", "--config", seed_path, "--json"]);
        let cs: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        let healthy = serde_json::json!([["enc-c", true], ["enc-d", true]]);
        (out.code == 0 && cs["hosts"][1]["encoders"] == healthy).then_some(cs)
    })
    .expect("cluster status with h2's healthy encoders");
    assert_eq!(cs["etcd"]["healthy"], true);
    assert_eq!(cs["leader"], "h1");
    assert_eq!(cs["channels"], 2);
    assert_eq!(cs["bad_keys"], serde_json::json!([]));
    let hosts = cs["hosts"].as_array().unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h["host"].as_str().unwrap()).collect();
    assert_eq!(names, ["h1", "h2"]);
    for h in hosts {
        assert_eq!(h["lease_s"], 1);
        assert!(
            h["ttl_s"].as_i64().is_some_and(|t| (0..=1).contains(&t)),
            "{h}"
        );
    }
    let human = etcd.nsfail(&["cluster", "status", "--config", seed.to_str().unwrap()]);
    assert!(human.stdout.contains("leader: h1"), "{}", human.stdout);
    let st = status(&sock2);
    let hosts: Vec<(String, String)> = st["encoders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["host"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        hosts,
        [
            ("enc-c".into(), "h2".into()),
            ("enc-d".into(), "h2".into()),
            ("enc-a".into(), "h1".into()),
            ("enc-b".into(), "h1".into())
        ],
        "h2's status names each encoder's host"
    );

    // A remap is the leader's: refused on h2; on h1 it reaches h2's maps through etcd.
    let refused = cli(&sock2, &["remap", "cam1", "enc-c"]);
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("leader"), "{}", refused.stderr);
    let t = Instant::now();
    assert_eq!(cli(&sock1, &["remap", "cam1", "enc-c"]).code, 0);
    let followed = wait_for(Duration::from_secs(5), || {
        is_on(&sock2, "cam1", "enc-c").then(|| t.elapsed())
    })
    .expect("h2 follows h1's remap");
    println!(
        "a remap on the leader in the follower's status after {:.1} ms (CLI polls)",
        followed.as_secs_f64() * 1000.0
    );
    assert_eq!(
        active_in_etcd(&etcd, &prefix, "cam1"),
        Some(("enc-c".into(), "h1".into()))
    );
    assert!(has_event(&sock2, "the cluster leader's choice"));
    // h2's data plane forwards cam1 to its own enc-c now.
    let ec = &lab2.encoders[0];
    let rx = burst_to(&lab2, ec, 7000, "10.77.0.2:41001", "10.77.0.1:5000", 30);
    assert_eq!(rx.seen().len(), 30, "h2 forwards cam1 to enc-c");
    assert_eq!(cli(&sock1, &["remap", "cam1", "enc-a"]).code, 0);
    let back = placed_within(&sock2, "cam1", "enc-a", Duration::from_secs(5));
    assert!(back);

    // h1 dies (SIGKILL): h2 is elected once h1's lease expires, finds enc-a down and moves
    // cam1 to its own enc-c, and writes that as the new leader.
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(h1.child.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let elected = wait_for(Duration::from_secs(6), || {
        (cluster_of(&sock2)["leading"] == true).then(|| killed.elapsed())
    })
    .unwrap_or_else(|| panic!("h2 elected:\n{}", log_of(&cfg2)));
    let written = wait_for(Duration::from_secs(6), || {
        (active_in_etcd(&etcd, &prefix, "cam1") == Some(("enc-c".into(), "h2".into())))
            .then(|| killed.elapsed())
    })
    .unwrap_or_else(|| panic!("h2 writes cam1 on enc-c:\n{}", log_of(&cfg2)));
    println!(
        "leader killed: new leader after {:.2} s, its failover in etcd after {:.2} s (lease 1 s)",
        elected.as_secs_f64(),
        written.as_secs_f64()
    );
    assert!(is_on(&sock2, "cam1", "enc-c"));
    drop(echoes1.drain(..));

    // etcd stops: h2 steps down, keeps forwarding, and fails cam2 over between its own
    // encoders when enc-c dies.
    etcd.kill();
    let lost = wait_for(Duration::from_secs(6), || {
        let c = cluster_of(&sock2);
        (c["etcd"] == false && c["leading"] == false).then_some(())
    });
    assert!(lost.is_some(), "h2 steps down:\n{}", log_of(&cfg2));
    assert!(has_event(&sock2, "cluster: etcd lost"));
    echoes2[0].stop();
    let local = placed_within(&sock2, "cam2", "enc-d", Duration::from_secs(5));
    assert!(local, "local failover without etcd:\n{}", log_of(&cfg2));
    let ed = &lab2.encoders[1];
    let rx = burst_to(&lab2, ed, 7002, "10.77.0.2:41002", "10.77.0.1:5002", 30);
    assert_eq!(
        rx.seen().len(),
        30,
        "h2 forwards cam2 to enc-d without etcd"
    );

    // etcd returns: h2 leads again and writes what it decided meanwhile.
    etcd.start();
    let again = wait_for(Duration::from_secs(10), || {
        (active_in_etcd(&etcd, &prefix, "cam2") == Some(("enc-d".into(), "h2".into())))
            .then_some(())
    });
    assert!(again.is_some(), "h2 leads again:\n{}", log_of(&cfg2));
    assert_eq!(cluster_of(&sock2)["etcd"], true);
    assert!(has_event(&sock2, "cluster: etcd is back"));
    assert_eq!(h2.stop(), Some(0));
    drop(h1);

    // Split brain: every active encoder written in the run came from the one leader of its
    // term, and h2's terms came after h1's.
    let mut terms: std::collections::BTreeMap<i64, std::collections::BTreeSet<String>> =
        Default::default();
    for (key, value) in etcd.history(&format!("{prefix}active/")) {
        let v: serde_json::Value = serde_json::from_slice(&value).expect("an active record");
        let (term, leader) = (v["term"].as_i64().unwrap(), v["leader"].as_str().unwrap());
        terms.entry(term).or_default().insert(leader.to_owned());
        assert!(key.starts_with(&format!("{prefix}active/cam")), "{key}");
    }
    assert!(
        terms.len() >= 3,
        "h1's term, h2's, h2's after etcd returned: {terms:?}"
    );
    assert!(
        terms.values().all(|leaders| leaders.len() == 1),
        "one writer per term: {terms:?}"
    );
    let order: Vec<&str> = terms
        .values()
        .map(|l| l.iter().next().unwrap().as_str())
        .collect();
    let first_h2 = order.iter().position(|l| *l == "h2").unwrap();
    assert!(
        order[..first_h2].iter().all(|l| *l == "h1")
            && order[first_h2..].iter().all(|l| *l == "h2"),
        "{terms:?}"
    );
}

/// A first start waits for an etcd that never answers, with nothing attached, and SIGTERM
/// ends the wait cleanly.
#[test]
fn a_host_waiting_for_etcd_stops_cleanly() {
    let lab = lab(2);
    let etcd = Etcd::new();
    let endpoint = etcd.link(&lab.rt.name, 1);
    let dir = TempDir::new();
    let cfg = dir.path.join("h1.toml");
    fs::write(
        &cfg,
        without_channels(&lab_config_with(&lab, &Policy::tolerant()))
            + &cluster_section(&unique("c"), "h1", &endpoint),
    )
    .unwrap();
    let pins = PinDir::new();
    let mut daemon = Daemon::spawn(&cfg, &dir.path.join("nsfail.sock"), &pins);
    let waiting = wait_for(Duration::from_secs(10), || {
        log_of(&cfg).contains("waiting for etcd").then_some(())
    });
    assert!(waiting.is_some(), "{}", log_of(&cfg));
    assert!(!xdp_attached(&lab.rt.name, "ing"));
    assert_eq!(daemon.stop(), Some(0), "{}", log_of(&cfg));
    assert!(log_of(&cfg).contains("stopped while waiting for etcd"));
    assert!(!xdp_attached(&lab.rt.name, "ing"), "nothing attached");
    assert!(
        !pins.pins.maps().exists() && !dir.path.join("nsfail.sock").exists(),
        "no maps pinned, no socket"
    );
}

/// A stream crosses hosts by the cluster's choices: the router sends the caller's packets to
/// host A; the leader's choice is encoder eb on host B, so A routes them to B, whose transit
/// entry (set by its daemon because the channel has encoders on other hosts) takes them into
/// eb, and eb's answers leave B from the ingest address. When eb dies, B publishes it, the
/// leader fails the channel over to A's own ea, and the stream follows.
#[test]
fn a_stream_crosses_hosts_by_the_leaders_choice() {
    let mut c = routed_cluster();
    let RoutedCluster {
        ref w,
        ref sock_a,
        ref cfg_a,
        ref cfg_b,
        ref prefix,
        ..
    } = c;
    // A cluster host without announce_table announces nothing: drain host is refused.
    let out = cli(sock_a, &["drain", "host"]);
    assert_eq!(out.code, 1, "drain host: {}", out.stdout);
    assert!(out.stderr.contains("with announce_table"), "{}", out.stderr);
    assert_eq!(status(sock_a)["cluster"]["drained"], false);
    let channel = sa(&format!("{ROUTED_INGEST}:5000"));
    let caller = sa("10.71.1.2:40000");
    let rx_a = Receiver::start(&w.ea, sa("10.71.5.2:7000"));
    let mut rx_b = Receiver::start(&w.eb, sa("10.71.4.2:7000"));
    let r = send_burst(
        &w.cl,
        caller,
        channel,
        0..200,
        Duration::from_millis(1),
        Duration::from_secs(2),
    );
    assert_eq!(
        rx_b.settled(),
        (0..200).collect(),
        "eb on host B got the stream routed by host A:\n{}\n{}",
        log_of(cfg_a),
        log_of(cfg_b)
    );
    assert_eq!(r.seqs(), (0..200).collect(), "every packet answered");
    assert!(r.from_only(channel), "answers come from the ingest address");
    assert!(rx_a.settled().is_empty());
    assert_eq!(rx_b.corrupt(), 0);

    // eb dies: B publishes it down, the leader A moves cam1 to its own ea.
    let t = Instant::now();
    rx_b.kill();
    c.echoes[1].stop();
    let moved = wait_for(Duration::from_secs(10), || {
        (placement(sock_a) == [("cam1".to_owned(), "ea".to_owned())]).then(|| t.elapsed())
    })
    .unwrap_or_else(|| panic!("failover to ea:\n{}\n{}", log_of(cfg_a), log_of(cfg_b)));
    println!(
        "eb on host B killed: the leader on A moved cam1 to ea after {:.0} ms",
        moved.as_secs_f64() * 1000.0
    );
    let written = wait_for(Duration::from_secs(2), || {
        (active_in_etcd(&w.etcd, prefix, "cam1") == Some(("ea".into(), "ha".into()))).then_some(())
    });
    assert!(written.is_some(), "the leader's failover in etcd");
    let r = send_burst(
        &w.cl,
        caller,
        channel,
        200..300,
        Duration::from_millis(1),
        Duration::from_secs(2),
    );
    assert_eq!(rx_a.settled(), (200..300).collect(), "ea has the stream");
    assert_eq!(r.seqs(), (200..300).collect());
    drop(c);
}

/// Issue 17, "What must be shown" 1: the active encoder's host freezes. Its daemon is stopped
/// (SIGSTOP) and its uplink's traffic dropped at the router, the link left up; only its lease
/// can tell. The leader (host A) sees B's encoders down when B's lease expires and moves the
/// stream to its own encoder; nothing is needed from B. The gap is printed (a figure, not a
/// pass line: `cargo xtask bench cluster` has it over 10 trials).
#[test]
fn the_active_encoders_host_frozen_moves_the_stream_to_the_backup_on_the_other_host() {
    let c = routed_cluster();
    let f = c.freeze_b();
    assert_eq!(
        f.before, 100,
        "the stream reached eb on B before the freeze"
    );
    assert!(
        f.ended_at_a,
        "the stream ended at ea on A:\n{}",
        log_of(&c.cfg_a)
    );
    assert_eq!(placement(&c.sock_a), [("cam1".to_owned(), "ea".to_owned())]);
    assert!(
        f.lost > 0,
        "B's frozen uplink lost the packets in flight to it"
    );
    println!(
        "host B frozen: {} of {} packets lost, a gap of about {:.0} ms (1 s lease)",
        f.lost, f.sent, f.gap_ms
    );
}

/// Issue 17, "What must be shown" 4: the leader's host freezes (its daemon SIGSTOPped, its
/// link to etcd dropping every packet at etcd's side, the link up). The other host is elected
/// within about one lease (the time is printed), moves the frozen host's channel to its own
/// encoder, and an encoder failure right after is still failed over by the new leader (the
/// stream ends at the backup; the gap is printed). When the old leader continues it rejoins as
/// a follower: it writes no active encoder, and the channel that failed over stays where it is.
#[test]
fn the_leaders_host_frozen_a_new_leader_handles_the_next_failure() {
    let mut t = two_hosts();
    let f = t
        .freeze_leader()
        .unwrap_or_else(|e| panic!("{e}\n{}", log_of(&t.cfg1)));
    println!(
        "leader's host frozen: h2 leads after {:.2} s, cam1 on h2's enc-c in etcd after {:.2} s \
         (lease 1 s)",
        f.elected.as_secs_f64(),
        f.moved.as_secs_f64()
    );
    let next = &f.next;
    assert!(
        next.ended_at_d,
        "cam2's stream ends at enc-d:\n{}",
        log_of(&t.cfg2)
    );
    assert_eq!(
        next.in_etcd,
        Some(("enc-d".into(), "h2".into())),
        "the new leader wrote cam2's failover"
    );
    println!(
        "enc-c killed right after: cam2 at enc-d, {} of {} packets lost, a gap of about {:.0} ms",
        next.lost, next.sent, next.gap_ms
    );
    // h1 continued: it follows h2, writes nothing, and nothing moves needlessly.
    assert!(
        f.rejoined,
        "h1 rejoins as a follower: {} {:?} vs {:?}\n{}",
        cluster_of(&t.sock1),
        placement(&t.sock1),
        placement(&t.sock2),
        log_of(&t.cfg1)
    );
    let after = &f.after;
    assert!(
        after.iter().all(|(_, v)| v["leader"] == "h2"),
        "only the new leader writes after h1 continues: {after:?}"
    );
    // cam1 had only the dead enc-c left while h1 was away: back to enc-a is its one move.
    let moves: Vec<(&str, &str)> = after
        .iter()
        .map(|(k, v)| {
            (
                k.rsplit('/').next().unwrap(),
                v["encoder"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        [("cam1", "enc-a")],
        "one legitimate move, cam2 stays on enc-d: {after:?}"
    );
    assert!(
        is_on(&t.sock2, "cam2", "enc-d"),
        "{:?}",
        placement(&t.sock2)
    );
    println!(
        "after h1 continued: {} active/ writes: {after:?}",
        after.len()
    );
}

/// A follower leaves failover to its leader, but not for ever: with 15 s leases, the leader
/// h1 is frozen (SIGSTOP; its lease lives on for 10 s at least, so nobody else is
/// elected), and enc-c, h2's encoder of cam2, dies while a stream runs through h2. h2 waits
/// its grace for a leader's choice that cannot come, then fails cam2 over to enc-d itself,
/// before h1's lease expires (h2's events: its own failover comes before it leads, if it
/// ever does). enc-c comes back while h1 is still frozen: h1's stale record (cam2 on enc-c)
/// does not pull the stream back. Once continued, the leader writes cam2 on enc-d.
#[test]
fn a_follower_fails_over_itself_what_a_frozen_leader_does_not_move() {
    let mut t = two_hosts_leased(15);
    let written = wait_for(Duration::from_secs(5), || {
        (active_in_etcd(&t.etcd, &t.prefix, "cam2") == Some(("enc-c".into(), "h1".into())))
            .then_some(())
    });
    assert!(
        written.is_some(),
        "h1 wrote cam2 on enc-c:\n{}",
        log_of(&t.cfg1)
    );
    let h1_pid = nix::unistd::Pid::from_raw(t.h1.child.pid());
    let frozen = Instant::now();
    nix::sys::signal::kill(h1_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let next = t.kill_enc_c(2000, Duration::from_millis(1), Duration::from_millis(300));
    // enc-c answers again; h2 sees it healthy, and keeps cam2 on enc-d past a round of
    // following (1 s).
    let ec = &t.lab2.encoders[0];
    t.echoes2[0] = Echo::start(&ec.ns, sa(&format!("{}:9000", ec.addr4)));
    let healthy = wait_for(Duration::from_secs(3), || {
        status(&t.sock2)["encoders"]
            .as_array()
            .is_some_and(|es| {
                es.iter()
                    .any(|e| e["name"] == "enc-c" && e["healthy"] == true)
            })
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(1200));
    let stayed = is_on(&t.sock2, "cam2", "enc-d");
    let view = cluster_of(&t.sock2);
    let stale = active_in_etcd(&t.etcd, &t.prefix, "cam2");
    let within = frozen.elapsed();
    let seen = events(&t.sock2);
    nix::sys::signal::kill(h1_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(healthy.is_some(), "enc-c healthy again on h2");
    assert_eq!(
        (view["leader"].as_str(), stale),
        (Some("h1"), Some(("enc-c".into(), "h1".into()))),
        "h1 still leads, its record stale, {within:?} after the freeze: {view}"
    );
    assert!(
        stayed,
        "the stale record does not pull cam2 back: {seen:#?}"
    );
    println!(
        "frozen leader, follower's own failover: {} of {} lost, gap {:.0} ms",
        next.lost, next.sent, next.gap_ms
    );
    assert!(
        next.ended_at_d,
        "cam2's stream ends at enc-d: {next:?}\n{}",
        log_of(&t.cfg2)
    );
    // Events are in order: h2 failed cam2 over itself before it led (if it leads yet).
    let position = |needle: &str| {
        seen.iter()
            .position(|e| e["reason"].as_str().unwrap_or_default().contains(needle))
    };
    let own = position("has not moved 1 channels off encoders down here");
    let led = position("this host (h2) is the leader");
    assert!(
        own.is_some() && led.is_none_or(|l| Some(l) > own),
        "{seen:#?}"
    );
    assert_eq!(
        count_events(&seen, "cam2", "encoder down: failover"),
        1,
        "{seen:#?}"
    );
    let agreed = wait_for(Duration::from_secs(10), || {
        active_in_etcd(&t.etcd, &t.prefix, "cam2")
            .is_some_and(|(encoder, _)| encoder == "enc-d")
            .then_some(())
    });
    assert!(
        agreed.is_some(),
        "the leader writes cam2 on enc-d: {:?}\n{}",
        active_in_etcd(&t.etcd, &t.prefix, "cam2"),
        log_of(&t.cfg1)
    );
    assert!(is_on(&t.sock2, "cam2", "enc-d"));
}

/// etcd out of space (the operator's world: a small `--quota-backend-bytes`, filled by another
/// client): etcd still answers reads but refuses writes. The host, alone and leading, fails
/// cam2 over when enc-a dies; its write of that choice is refused, and it says why (etcd's
/// own words), keeps the move, keeps forwarding to enc-b and falls back to deciding alone.
/// enc-a comes back meanwhile: etcd's stale record is not taken. Once the operator frees the
/// space and disarms the alarm, the host rejoins and etcd holds cam2 on enc-b.
#[test]
fn etcd_out_of_space_is_said_and_the_host_fails_static() {
    let lab = lab(2);
    let mut echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&format!("{}:9000", e.addr4))))
        .collect();
    let mut etcd = Etcd::new();
    let endpoint = etcd.link(&lab.rt.name, 1);
    etcd.start_with(&["--quota-backend-bytes=4194304"]);
    let name = unique("c");
    let prefix = format!("/nsfail/{name}/");
    let dir = TempDir::new();
    let full = without_channels(&lab_config_with(&lab, &Policy::default()));
    etcd.seed(
        &dir.path.join("seed.toml"),
        &(lab_config_with(&lab, &Policy::default())
            + &cluster_section(&name, "seed", "http://127.0.0.1:2379")),
    );
    let host_cfg = dir.path.join("h1.toml");
    fs::write(&host_cfg, full + &cluster_section(&name, "h1", &endpoint)).unwrap();
    let socket = dir.path.join("nsfail.sock");
    let pins = PinDir::new();
    let _daemon = Daemon::start(&host_cfg, &socket, &pins);
    let written = wait_for(Duration::from_secs(10), || {
        (active_in_etcd(&etcd, &prefix, "cam2") == Some(("enc-a".into(), "h1".into())))
            .then_some(())
    });
    assert!(
        written.is_some(),
        "h1 leads and writes:\n{}",
        log_of(&host_cfg)
    );

    // Another client fills etcd until it raises its NOSPACE alarm.
    let junk = vec![b'x'; 512 * 1024];
    let mut full_at = None;
    for i in 0..64 {
        let key = format!("/junk/{i}");
        let value = junk.clone();
        let put = etcd.client_blocking(|mut c| async move { c.put(key, value, None).await });
        if let Err(e) = put {
            full_at = Some(e);
            break;
        }
    }
    let refusal = full_at.expect("etcd refuses writes once full");
    assert!(refusal.contains("space exceeded"), "{refusal}");

    // enc-a dies: the move is made here, the write refused and said.
    echoes[0].stop();
    let moved = placed_within(&socket, "cam2", "enc-b", Duration::from_secs(10));
    assert!(moved, "{:?}\n{}", placement(&socket), log_of(&host_cfg));
    let said = wait_for(Duration::from_secs(10), || {
        has_event(&socket, "database space exceeded").then_some(())
    });
    assert!(
        said.is_some(),
        "{:#?}\n{}",
        events(&socket),
        log_of(&host_cfg)
    );
    let view = cluster_of(&socket);
    assert_eq!(view["leading"], false, "no leader without writes: {view}");
    // The data plane forwards to enc-b all along.
    let eb = &lab.encoders[1];
    let rx = burst_to(&lab, eb, 7002, "10.77.0.2:41000", "10.77.0.1:5002", 50);
    assert_eq!(
        rx.settled().len(),
        50,
        "cam2 forwards to enc-b while etcd is full"
    );

    // enc-a answers again while etcd is still full: etcd's record (cam2 on enc-a, written
    // before) is stale, and the host, deciding alone, does not take it (cam2's failback is
    // manual).
    echoes[0] = Echo::start(
        &lab.encoders[0].ns,
        sa(&format!("{}:9000", lab.encoders[0].addr4)),
    );
    let healthy = wait_for(Duration::from_secs(5), || {
        status(&socket)["encoders"]
            .as_array()
            .is_some_and(|es| {
                es.iter()
                    .any(|e| e["name"] == "enc-a" && e["healthy"] == true)
            })
            .then_some(())
    });
    assert!(healthy.is_some(), "enc-a healthy again");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        is_on(&socket, "cam2", "enc-b"),
        "no stale record taken: {:#?}",
        events(&socket)
    );

    // The operator frees the space and disarms the alarm: the host rejoins, and etcd
    // holds its choice.
    etcd.client_blocking(|mut c| async move {
        c.delete(
            "/junk/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
        let revision = c.status().await?.header().map_or(0, |h| h.revision());
        c.compact(revision, None).await?;
        c.defragment().await?;
        // As `etcdctl alarm disarm` does: each raised alarm, by its member.
        let raised = c
            .alarm(
                etcd_client::AlarmAction::Get,
                etcd_client::AlarmType::None,
                None,
            )
            .await?;
        for alarm in raised.alarms() {
            let mut options = etcd_client::AlarmOptions::new();
            options.with_member(alarm.member_id());
            c.alarm(
                etcd_client::AlarmAction::Deactivate,
                etcd_client::AlarmType::Nospace,
                Some(options),
            )
            .await?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("freeing etcd: {e}"));
    let probe = etcd.client_blocking(|mut c| async move { c.put("/probe", "x", None).await });
    assert!(probe.is_ok(), "etcd takes writes again: {probe:?}");
    let back = wait_for(Duration::from_secs(15), || {
        (active_in_etcd(&etcd, &prefix, "cam2") == Some(("enc-b".into(), "h1".into())))
            .then_some(())
    });
    assert!(
        back.is_some(),
        "{:?}\n{}",
        active_in_etcd(&etcd, &prefix, "cam2"),
        log_of(&host_cfg)
    );
    assert!(has_event(&socket, "cluster: etcd is back"));
}

/// Issue 17, "What must be shown" 5: etcd stops for 30 s while a stream runs through each
/// host (cam1 through h1 to enc-a, cam2 through h2 to enc-c). No packet of cam1's stream is
/// lost; enc-c dies during the outage and h2 fails cam2 over to its own enc-d without etcd;
/// when etcd returns (restarted on its data) both hosts and etcd's active/ keys agree (the
/// time is printed) and the only write is cam2's move to enc-d, once.
#[test]
fn etcd_stopped_for_30_s_loses_nothing_and_converges_without_needless_moves() {
    let mut t = two_hosts();
    let o = t
        .stop_etcd(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        o.local_failover,
        "h2 fails cam2 over without etcd:\n{}",
        log_of(&t.cfg2)
    );
    let agreed = o.agreed.unwrap_or_else(|| {
        panic!(
            "hosts and etcd agree: {:?} {:?}\n{}\n{}",
            placement(&t.sock1),
            placement(&t.sock2),
            log_of(&t.cfg1),
            log_of(&t.cfg2)
        )
    });
    println!(
        "etcd stopped 30 s: cam1 {} sent, {} lost; cam2 (enc-c killed in the outage) {} sent, \
         {} lost; hosts and etcd agree {:.0} ms after etcd answered again",
        o.sent,
        o.lost_cam1,
        o.sent,
        o.lost_cam2,
        agreed.as_secs_f64() * 1e3
    );
    assert_eq!(o.lost_cam1, 0, "no loss on cam1");
    assert!(o.ended_at_d, "cam2's stream ends at enc-d");
    println!(
        "active/ writes after the outage began: {}, moves: {:?}",
        o.writes, o.moves
    );
    assert_eq!(
        o.moves,
        [("cam2".to_owned(), "enc-d".to_owned())],
        "the one legitimate move, once"
    );
}

/// Failback survives a change of leader. cam3 and cam4 (enc-c then enc-d on h2, failback
/// auto, hold-down 1 s) both leave enc-c: cam4 by a remap on the leader h1 (by hand), cam3
/// when enc-c fails (automatic). h2, a follower, moves neither itself: it takes both moves
/// from h1's records, so only the records' `manual` flag tells them apart. h1 is killed and
/// h2 leads; when enc-c is healthy again, h2 fails cam3 back to it, as h1 would have, and
/// leaves cam4 on enc-d, where it was put by hand. (Without the flag h2 would fail back
/// neither, or both.)
#[test]
fn a_new_leader_fails_back_what_the_old_one_failed_over_and_not_what_it_placed_by_hand() {
    let mut t = two_hosts();
    for (name, port) in [("cam3", 5004), ("cam4", 5006)] {
        let channel = serde_json::json!({
            "name": name,
            "listen": format!("10.77.0.1:{port}"),
            "encoders": ["enc-c", "enc-d"],
            "port": port + 2000,
            "failback": "auto",
            "hold_down_ms": 1000,
        });
        t.etcd.put(
            &format!("{}channels/{name}", t.prefix),
            channel.to_string().as_bytes(),
            None,
        );
    }
    let placed = wait_for(Duration::from_secs(10), || {
        (["cam3", "cam4"]
            .iter()
            .all(|ch| is_on(&t.sock1, ch, "enc-c") && is_on(&t.sock2, ch, "enc-c")))
        .then_some(())
    });
    assert!(
        placed.is_some(),
        "{:?}\n{}",
        placement(&t.sock2),
        log_of(&t.cfg1)
    );
    let remap = cli(&t.sock1, &["remap", "cam4", "enc-d"]);
    assert_eq!(remap.code, 0, "{}", remap.stderr);
    t.echoes2[0].stop();
    let record = |ch: &str| -> serde_json::Value {
        t.etcd
            .get(&format!("{}active/{ch}", t.prefix))
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default()
    };
    let failed_over = wait_for(Duration::from_secs(10), || {
        (record("cam3")["encoder"] == "enc-d" && record("cam4")["encoder"] == "enc-d").then_some(())
    });
    assert!(
        failed_over.is_some(),
        "{} {}\n{}",
        record("cam3"),
        record("cam4"),
        log_of(&t.cfg1)
    );
    assert_eq!(record("cam3")["manual"], false, "{}", record("cam3"));
    assert_eq!(record("cam4")["manual"], true, "{}", record("cam4"));
    // h2 saw enc-c fail itself, but the move was h1's: h2 took it from etcd.
    let followed = wait_for(Duration::from_secs(5), || {
        (is_on(&t.sock2, "cam3", "enc-d") && is_on(&t.sock2, "cam4", "enc-d")).then_some(())
    });
    assert!(followed.is_some(), "{:?}", placement(&t.sock2));
    let seen = events(&t.sock2);
    assert_eq!(
        count_events(&seen, "cam3", "encoder down: failover"),
        0,
        "a follower makes no failover of its own: {seen:#?}"
    );
    assert_eq!(
        count_events(&seen, "cam3", "the cluster leader's choice"),
        1,
        "{seen:#?}"
    );

    // h1 dies; h2 leads once h1's lease expires.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.h1.child.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let leads = wait_for(Duration::from_secs(8), || {
        (cluster_of(&t.sock2)["leading"] == true).then_some(())
    });
    assert!(leads.is_some(), "h2 leads:\n{}", log_of(&t.cfg2));
    let ec = &t.lab2.encoders[0];
    t.echoes2[0] = Echo::start(&ec.ns, sa(&format!("{}:9000", ec.addr4)));
    let back = wait_for(Duration::from_secs(10), || {
        (record("cam3")["encoder"] == "enc-c" && record("cam3")["leader"] == "h2").then_some(())
    });
    assert!(
        back.is_some(),
        "h2 fails cam3 back to enc-c: {}\n{}",
        record("cam3"),
        log_of(&t.cfg2)
    );
    assert!(
        is_on(&t.sock2, "cam3", "enc-c"),
        "{:?}",
        placement(&t.sock2)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(record("cam4")["encoder"], "enc-d", "{}", record("cam4"));
    assert!(
        is_on(&t.sock2, "cam4", "enc-d"),
        "{:?}",
        placement(&t.sock2)
    );
}

fn drained_on(socket: &std::path::Path, encoder: &str) -> Option<bool> {
    status(socket)["encoders"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == encoder)?["drained"]
        .as_bool()
}

/// A drain is the cluster's: made on the leader, it is written to etcd (`drains/<encoder>`,
/// no lease), every host drains the encoder, and it outlives the leader that made it: the
/// next leader still refuses to put a channel on it, until `undrain` deletes the key and
/// every host undrains it. Before, a drain lived in the leader's memory only.
#[test]
fn a_drain_is_the_clusters_and_outlives_the_leader_that_made_it() {
    let mut c: RoutedCluster = routed_cluster();
    let key = format!("{}drains/eb", c.prefix);
    // Only the leader (ha) drains.
    let refused = cli(&c.sock_b, &["drain", "eb"]);
    assert_eq!(refused.code, 1, "{}", refused.stdout);
    assert!(refused.stderr.contains("leader"), "{}", refused.stderr);
    assert!(c.w.etcd.get(&key).is_none());

    let drained = cli(&c.sock_a, &["drain", "eb"]);
    assert_eq!(drained.code, 0, "drain: {}", drained.stderr);
    let rec: serde_json::Value =
        serde_json::from_slice(&c.w.etcd.get(&key).expect("drains/eb in etcd")).unwrap();
    assert_eq!(rec, serde_json::json!({"encoder": "eb", "by": "ha"}));
    let everywhere = wait_for(Duration::from_secs(5), || {
        (drained_on(&c.sock_a, "eb") == Some(true)
            && drained_on(&c.sock_b, "eb") == Some(true)
            && placement(&c.sock_a) == [("cam1".to_owned(), "ea".to_owned())]
            && placement(&c.sock_b) == [("cam1".to_owned(), "ea".to_owned())])
        .then_some(())
    });
    assert!(
        everywhere.is_some(),
        "eb drained on both hosts, cam1 on ea: {:?} {:?}",
        placement(&c.sock_a),
        placement(&c.sock_b)
    );

    // ha stops (its lease revoked): hb leads; ha comes back as a follower.
    assert_eq!(c.a.stop(), Some(0), "{}", log_of(&c.cfg_a));
    let b_leads = wait_for(Duration::from_secs(10), || {
        (cluster_of(&c.sock_b)["leading"] == true).then_some(())
    });
    assert!(b_leads.is_some(), "hb leads:\n{}", log_of(&c.cfg_b));
    c.a = Daemon::start(&c.cfg_a, &c.sock_a, &c.pins.0);
    let back = wait_for(Duration::from_secs(10), || {
        let st = status(&c.sock_b);
        let healthy = st["encoders"]
            .as_array()?
            .iter()
            .filter(|e| e["healthy"] == true)
            .count();
        (healthy == 2).then_some(())
    });
    assert!(back.is_some(), "ea healthy again:\n{}", log_of(&c.cfg_b));
    for sock in [&c.sock_a, &c.sock_b] {
        assert_eq!(drained_on(sock, "eb"), Some(true), "still drained");
    }
    let remap = cli(&c.sock_b, &["remap", "cam1", "eb"]);
    assert_eq!(remap.code, 1, "the new leader keeps eb drained");
    assert!(remap.stderr.contains("drained"), "{}", remap.stderr);
    assert_eq!(placement(&c.sock_b), [("cam1".to_owned(), "ea".to_owned())]);

    // undrain on the new leader: the key goes, every host undrains it.
    let undrained = cli(&c.sock_b, &["undrain", "eb"]);
    assert_eq!(undrained.code, 0, "undrain: {}", undrained.stderr);
    assert!(c.w.etcd.get(&key).is_none());
    let everywhere = wait_for(Duration::from_secs(5), || {
        (drained_on(&c.sock_a, "eb") == Some(false) && drained_on(&c.sock_b, "eb") == Some(false))
            .then_some(())
    });
    assert!(everywhere.is_some(), "eb undrained on both hosts");
    let remap = cli(&c.sock_b, &["remap", "cam1", "eb"]);
    assert_eq!(remap.code, 0, "{}", remap.stderr);
}
