//! A cluster host on more channels than one read of etcd returns (issue 17, "What must be
//! shown" 6; the figures are `cargo xtask bench cluster-scale`'s): its start-up reads the
//! prefix in pages, and as the new leader it writes every channel's active encoder in
//! batched transactions, each guarded by its election key; a channel added to etcd then is
//! written on its own.

use std::{collections::BTreeSet, fs, net::SocketAddr, time::Duration};

use etcd_client::GetOptions;
use nsfail_tests::{
    PinDir,
    cluster::{Etcd, cluster_section, log_of, without_channels},
    daemon::{Daemon, Policy, TempDir, lab_config_with, placed_within, placement},
    lab,
    traffic::{Echo, Receiver, send_burst},
    unique, wait_for,
};

/// More than two pages of [`nsfail::cluster::store::PAGE`] keys, and many transactions of
/// the leader's writes.
const CHANNELS: usize = 2_500;

fn listen(i: usize) -> SocketAddr {
    SocketAddr::new(
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 80, 0, 1)) + i as u32)
            .into(),
        5000,
    )
}

/// Every key under `prefix` with its value and create revision (one unpaged read: the
/// test's etcd answers a few hundred KiB).
fn all_under(etcd: &Etcd, prefix: &str) -> Vec<(String, Vec<u8>, i64)> {
    let prefix = prefix.to_owned();
    etcd.client_blocking(|mut c| async move {
        let resp = c.get(prefix, Some(GetOptions::new().with_prefix())).await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                    kv.create_revision(),
                )
            })
            .collect())
    })
    .expect("etcd get")
}

/// 2,500 channels in etcd: the host starts with all of them in its data plane (the last
/// one, in the last page, forwards), and as the leader writes all 2,500 active encoders,
/// every one with the term of its election key, without losing its 1 s lease meanwhile.
#[test]
fn a_host_takes_more_channels_than_one_page_and_leads_them_all() {
    assert!(CHANNELS as i64 > 2 * nsfail::cluster::store::PAGE);
    let lab = lab(2);
    lab.src
        .ip(&["route", "add", "10.80.0.0/16", "via", "10.77.0.1"])
        .unwrap();
    let _echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, format!("{}:9000", e.addr4).parse().unwrap()))
        .collect();
    let mut etcd = Etcd::new();
    let endpoint = etcd.link(&lab.rt.name, 1);
    etcd.start();
    let name = unique("c");
    let prefix = format!("/nsfail/{name}/");
    let dir = TempDir::new();
    let host = without_channels(&lab_config_with(&lab, &Policy::tolerant()));
    let mut seed = host.clone();
    for i in 0..CHANNELS {
        seed += &format!(
            "[[channel]]\nname = \"ch{i}\"\nlisten = \"{}\"\nencoders = [\"enc-a\", \"enc-b\"]\nport = {}\n",
            listen(i),
            10_000 + i
        );
    }
    etcd.seed(
        &dir.path.join("seed.toml"),
        &(seed + &cluster_section(&name, "seed", "http://127.0.0.1:2379")),
    );

    let cfg = dir.path.join("h1.toml");
    fs::write(&cfg, host + &cluster_section(&name, "h1", &endpoint)).unwrap();
    let socket = dir.path.join("h1.sock");
    let pins = PinDir::new();
    let _h1 = Daemon::start(&cfg, &socket, &pins);
    let names: BTreeSet<String> = placement(&socket).into_iter().map(|(n, _)| n).collect();
    let want: BTreeSet<String> = (0..CHANNELS).map(|i| format!("ch{i}")).collect();
    assert_eq!(
        names.len(),
        CHANNELS,
        "every channel in etcd is applied at start-up:\n{}",
        log_of(&cfg)
    );
    assert_eq!(names, want);

    // The last channel (in the last page) forwards to enc-a.
    let last = CHANNELS - 1;
    let ea = &lab.encoders[0];
    let rx = Receiver::start(
        &ea.ns,
        format!("{}:{}", ea.addr4, 10_000 + last).parse().unwrap(),
    );
    send_burst(
        &lab.src,
        "10.77.0.2:41000".parse().unwrap(),
        listen(last),
        0..20,
        Duration::from_millis(2),
        Duration::from_secs(2),
    );
    assert_eq!(rx.seen().len(), 20, "the last channel forwards");

    // The leader writes every channel's active encoder, all with the term it won.
    let actives = wait_for(Duration::from_secs(20), || {
        let a = all_under(&etcd, &format!("{prefix}active/"));
        (a.len() == CHANNELS).then_some(a)
    })
    .unwrap_or_else(|| panic!("h1 writes every active encoder:\n{}", log_of(&cfg)));
    let election = all_under(&etcd, &format!("{prefix}leader/"));
    assert_eq!(election.len(), 1, "one candidate: {election:?}");
    let term = election[0].2;
    for (key, value, _) in &actives {
        let v: serde_json::Value = serde_json::from_slice(value).unwrap();
        assert_eq!(v["leader"], "h1", "{key}");
        assert_eq!(v["term"], term, "{key}: written with the leader's term");
        assert_eq!(v["encoder"], "enc-a", "{key}");
    }
    // A channel put into etcd by another writer is added on its own (only its entries are
    // written) and forwards.
    let extra = CHANNELS;
    etcd.put(
        &format!("{prefix}channels/extra"),
        format!(
            r#"{{"name":"extra","listen":"{}","encoders":["enc-b","enc-a"],"port":{}}}"#,
            listen(extra),
            10_000 + extra
        )
        .as_bytes(),
        None,
    );
    let added = placed_within(&socket, "extra", "enc-b", Duration::from_secs(5));
    assert!(added, "extra added:\n{}", log_of(&cfg));
    assert_eq!(placement(&socket).len(), CHANNELS + 1);
    let eb = &lab.encoders[1];
    let rx = Receiver::start(
        &eb.ns,
        format!("{}:{}", eb.addr4, 10_000 + extra).parse().unwrap(),
    );
    send_burst(
        &lab.src,
        "10.77.0.2:41001".parse().unwrap(),
        listen(extra),
        0..20,
        Duration::from_millis(2),
        Duration::from_secs(2),
    );
    assert_eq!(rx.seen().len(), 20, "the added channel forwards to enc-b");
    // Its own writes did not cost it its lease (the session would have started again).
    assert!(
        !log_of(&cfg).contains("etcd lost"),
        "the session held:\n{}",
        log_of(&cfg)
    );
}
