//! The cluster lab's processes, started in order: etcd with the channels, the encoders, the
//! hosts' daemons (their configs), the BIRDs, then (once the router's route is up) the caller.

use super::*;

/// etcd in its namespace, then the lab's channels written to it (as `nsfail apply` would).
pub(super) fn start_etcd(b: &mut Builder<ClusterLabInfo>, ns: &str) -> Result<()> {
    let data = b.dir.etcd_data();
    b.spawn("etcd", ns, etcd::command(&data), None)?;
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, etcd::PORT));
    let begun = Instant::now();
    while netns::in_netns(ns, move || {
        TcpStream::connect_timeout(&local, Duration::from_millis(200))
    })
    .map_err(ctl::io_err(format!("enter {ns}")))?
    .is_err()
    {
        if begun.elapsed() > ETCD_WAIT {
            return Err(LabCtlError::Start {
                name: "etcd".to_owned(),
                detail: format!(
                    "no answer on port {} after {ETCD_WAIT:?}: {}",
                    etcd::PORT,
                    ctl::log_tail(&b.dir.log("etcd"))
                ),
            });
        }
        thread::sleep(POLL);
    }
    let channels = channels();
    b.info.channels = channels
        .iter()
        .map(|c| ClusterLabChannel {
            name: c.name.clone(),
            listen: c.listen,
            protocol: c.protocol.as_str().to_owned(),
            encoders: c.encoders.clone(),
        })
        .collect();
    b.save()?;
    let cluster = cluster("seed", &format!("http://{local}"));
    let apply = move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut client = crate::cluster::store::connect(&cluster).await?;
            crate::cluster::store::apply(&mut client, &cluster, &channels, false).await
        })
        .map(drop)
        .map_err(|e| format!("{e:#}"))
    };
    netns::in_netns(ns, apply)
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|detail| LabCtlError::Start {
            name: "the lab's channels in etcd".to_owned(),
            detail,
        })
}

/// The lab's channels: `cam-udp` over every host's `a` encoder, `cam-srt` over every `b`.
fn channels() -> Vec<Channel> {
    [
        ("cam-udp", UDP_PORT, UDP_ENCODER_PORT, Protocol::Udp, 'a'),
        ("cam-srt", SRT_PORT, SRT_ENCODER_PORT, Protocol::Srt, 'b'),
    ]
    .into_iter()
    .map(|(name, listen, port, protocol, letter)| Channel {
        name: name.into(),
        listen: SocketAddr::from((INGEST, listen)),
        encoders: (1..=HOSTS).map(|i| format!("h{i}-{letter}")).collect(),
        port: Some(port),
        failback: Failback::Manual,
        hold_down_ms: crate::config::DEFAULT_HOLD_DOWN_MS,
        protocol,
        sources: Vec::new(),
        srt_peer_limit: None,
    })
    .collect()
}

fn cluster(host: &str, endpoint: &str) -> Cluster {
    Cluster {
        name: CLUSTER.to_owned(),
        host: Some(host.to_owned()),
        etcd: vec![endpoint.to_owned()],
        lease_s: 1,
        announce_table: Some(TABLE),
    }
}

/// A host's daemon config: its uplink as the ingest interface, its two encoders (a UDP echo
/// answers each one's health probes), `[cluster]`; no channels (they live in etcd).
pub(super) fn host_config(h: &ClusterLabHost, etcd: &str) -> String {
    let i: u8 = h.name[1..].parse().expect("hosts are named h1, h2, ...");
    let config = Config {
        ingest: Ingest {
            interface: UPLINK.to_owned(),
            xdp_mode: XdpMode::Native,
            metrics: METRICS.parse().expect("a socket address"),
            netns: Some(h.netns.clone()),
            log_level: None,
        },
        encoders: h
            .encoders
            .iter()
            .zip([('a', 0), ('b', 1)])
            .map(|(name, (letter, j))| Encoder {
                name: name.clone(),
                address: IpAddr::V4(addr(encoder_net(i, j), FAR)),
                interface: Some(format!("v{letter}")),
                netns: Some(format!("{}{letter}", h.netns)),
                mac: None,
                allow: Vec::new(),
                health: Health {
                    kind: HealthKind::Udp,
                    port: Some(ECHO_PORT),
                    rise: 3,
                    fall: 5,
                    ..Health::default()
                },
                spawn: None,
                restart: Restart::default(),
                env: Default::default(),
                prefix: None,
            })
            .collect(),
        channels: Vec::new(),
        daemon: Default::default(),
        cluster: Some(cluster(&h.name, etcd)),
    };
    format!(
        "# Host {} of the cluster lab, written by `nsfail lab cluster up`; `nsfail lab \
         cluster down` removes it.\n\n{}",
        h.name,
        config.to_toml()
    )
}

/// Each encoder's receiver (`a`: UDP on 7000, `b`: SRT listener on 7001; the stream goes to
/// its output file) and its health echo.
pub(super) fn start_encoders(
    b: &mut Builder<ClusterLabInfo>,
    hosts: &[ClusterLabHost],
) -> Result<()> {
    for h in hosts {
        for (name, letter) in h.encoders.iter().zip(['a', 'b']) {
            let ns = format!("{}{letter}", h.netns);
            let output = b.dir.output(name);
            fs::File::create(&output)
                .map_err(ctl::io_err(format!("create {}", output.display())))?;
            b.info.outputs.push((name.clone(), output.clone()));
            let receiver = match letter {
                'a' => udp_receiver(UDP_ENCODER_PORT),
                _ => srt_receiver(SRT_ENCODER_PORT),
            };
            b.spawn(&format!("{name}-receiver"), &ns, receiver, Some(&output))?;
            b.spawn(&format!("{name}-echo"), &ns, udp_echo(ECHO_PORT), None)?;
        }
    }
    Ok(())
}

/// The router's BIRD and each host's.
pub(super) fn start_birds(
    b: &mut Builder<ClusterLabInfo>,
    rt: &str,
    hosts: &[ClusterLabHost],
) -> Result<()> {
    let peers: Vec<(String, String)> = hosts
        .iter()
        .zip(1..)
        .map(|(h, i)| (addr(uplink_net(i), NEAR).to_string(), h.uplink.to_string()))
        .collect();
    let peers: Vec<(&str, &str)> = peers.iter().map(|(r, h)| (&r[..], &h[..])).collect();
    let router = bird::router_conf(&b.dir.log("bird-router-routes"), &peers, BFD);
    let mut birds = vec![("router".to_owned(), rt.to_owned(), router)];
    for (h, (near, me)) in hosts.iter().zip(&peers) {
        let log = b.dir.log(&format!("bird-{}-routes", h.name));
        let conf = bird::host_conf(&log, me, near, TABLE, BFD);
        birds.push((h.name.clone(), h.netns.clone(), conf));
    }
    for (name, ns, conf) in birds {
        let path = b.dir.bird_config(&name);
        fs::File::create(&path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(ctl::io_err(format!("write {}", path.display())))?;
        let cmdline = [
            "bird".to_owned(),
            "-f".to_owned(),
            "-c".to_owned(),
            path.display().to_string(),
            "-s".to_owned(),
            b.dir.bird_socket(&name).display().to_string(),
        ];
        b.spawn(&format!("bird-{name}"), &ns, cmdline.to_vec(), None)?;
    }
    Ok(())
}

/// Waits until the router's route to the ingest address has every host as a next hop: each
/// daemon is up, has the channels from etcd and announces, and each BGP session is up. A
/// process of the lab that exits meanwhile fails it at once.
pub(super) fn wait_for_ecmp(
    b: &mut Builder<ClusterLabInfo>,
    rt: &str,
    hosts: &[ClusterLabHost],
) -> Result<()> {
    let all: Vec<IpAddr> = hosts.iter().map(|h| IpAddr::V4(h.uplink)).collect();
    let ingest = INGEST.to_string();
    let begun = Instant::now();
    loop {
        let hops = bird::next_hops(rt, &ingest)?;
        if hops == all {
            return Ok(());
        }
        b.exited()?;
        if begun.elapsed() > ROUTE_WAIT {
            return Err(LabCtlError::Start {
                name: "anycast".to_owned(),
                detail: format!(
                    "the router's next hops for {ingest} after {ROUTE_WAIT:?} are {hops:?}, not \
                     {all:?}; the daemons' and BIRDs' logs are in {}",
                    b.dir.root().display()
                ),
            });
        }
        thread::sleep(POLL);
    }
}

/// The caller: one live test picture, sent as plain UDP to `cam-udp` and through an SRT caller
/// to `cam-srt` (ffmpeg's tee muxer: one encode, two outputs).
pub(super) fn start_caller(b: &mut Builder<ClusterLabInfo>, cl: &str) -> Result<()> {
    let relay = [
        "srt-live-transmit".to_owned(),
        "-a".to_owned(),
        "yes".to_owned(),
        "-q".to_owned(),
        RELAY.to_owned(),
        format!("srt://{INGEST}:{SRT_PORT}?mode=caller"),
    ];
    b.spawn("caller-srt", cl, relay.to_vec(), None)?;
    let outputs = format!(
        "[f=mpegts:onfail=ignore]udp://{INGEST}:{UDP_PORT}?pkt_size=1316|\
         [f=mpegts:onfail=ignore]{RELAY}?pkt_size=1316"
    );
    let ffmpeg = test_stream(&[
        "-map".to_owned(),
        "0:v".to_owned(),
        "-f".to_owned(),
        "tee".to_owned(),
        outputs,
    ]);
    b.spawn("caller-ffmpeg", cl, ffmpeg, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_config_reads_back_as_built() {
        let h = ClusterLabHost {
            name: "h2".into(),
            netns: "nsfc-h2".into(),
            config: "/l/h2.toml".into(),
            socket: "/l/h2.sock".into(),
            pins: "/sys/fs/bpf/nsfc-h2".into(),
            uplink: addr(2, FAR),
            encoders: vec!["h2-a".into(), "h2-b".into()],
        };
        let text = host_config(&h, "http://10.78.200.2:2379");
        let cfg = Config::parse(&text, "lab").expect("the host's config parses");
        assert_eq!(cfg.ingest.netns.as_deref(), Some("nsfc-h2"));
        assert_eq!(cfg.encoders[1].address.to_string(), "10.78.22.2");
        assert_eq!(cfg.encoders[1].netns.as_deref(), Some("nsfc-h2b"));
        let cluster = cfg.cluster.expect("[cluster]");
        assert_eq!(cluster.host.as_deref(), Some("h2"));
        assert_eq!(cluster.announce_table, Some(TABLE));
        assert!(cfg.channels.is_empty());
        let names: Vec<_> = channels().into_iter().map(|c| c.encoders).collect();
        assert_eq!(names[1], ["h1-b", "h2-b", "h3-b"]);
    }
}
