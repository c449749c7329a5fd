//! Two cluster hosts, each in its own lab with its own two encoders, on one etcd: the world of
//! issue 17's leader-loss and etcd-outage cases ("What must be shown" 4 and 5). The
//! measurements live here so that `tests/tests/cluster.rs` asserts on them and `cargo xtask
//! bench cluster` reports them from the same code.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{Etcd, cluster_of, cluster_section, log_of, without_channels};
use crate::{
    PinDir,
    daemon::{Daemon, Policy, TempDir, lab_config_with, placement},
    lab,
    traffic::{Echo, Receiver, spawn_burst},
    unique, wait_for,
};

/// The seed file of the two-host world: every encoder of the cluster (for the file's own
/// checks), cam1 on h1's enc-a then h2's enc-c, cam2 on h2's enc-c then enc-d.
pub fn two_host_seed(name: &str) -> String {
    let mut s = "[ingest]\ninterface = \"seed\"\n".to_owned();
    for (i, enc) in ["enc-a", "enc-b", "enc-c", "enc-d"].iter().enumerate() {
        s += &format!(
            "[[encoder]]\nname = \"{enc}\"\naddress = \"10.77.{}.2\"\nmac = \"02:00:00:00:00:0{i}\"\nhealth = {{ kind = \"udp\", port = 9000 }}\n",
            i % 2 + 1
        );
    }
    s += "[[channel]]\nname = \"cam1\"\nlisten = \"10.77.0.1:5000\"\nencoders = [\"enc-a\", \"enc-c\"]\nport = 7000\n";
    s += "[[channel]]\nname = \"cam2\"\nlisten = \"10.77.0.1:5002\"\nencoders = [\"enc-c\", \"enc-d\"]\nport = 7002\n";
    s + &cluster_section(name, "seed", "http://127.0.0.1:2379")
}

/// The leader's choice for `channel` in etcd: (encoder, leader).
pub fn active_in_etcd(etcd: &Etcd, prefix: &str, channel: &str) -> Option<(String, String)> {
    let v = etcd.get(&format!("{prefix}active/{channel}"))?;
    let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
    Some((
        v["encoder"].as_str()?.to_owned(),
        v["leader"].as_str()?.to_owned(),
    ))
}

/// Two hosts, h1 leading, h2 following, cam1 on h1's enc-a and cam2 on h2's enc-c. Fields
/// drop in order: daemons, pins, echoes, etcd, labs.
pub struct TwoHosts {
    pub h1: Daemon,
    pub h2: Daemon,
    _pins: (PinDir, PinDir),
    pub echoes1: Vec<Echo>,
    pub echoes2: Vec<Echo>,
    pub sock1: PathBuf,
    pub sock2: PathBuf,
    pub cfg1: PathBuf,
    pub cfg2: PathBuf,
    pub prefix: String,
    pub dir: TempDir,
    pub etcd: Etcd,
    pub lab1: nsfail::lab::Lab,
    pub lab2: nsfail::lab::Lab,
}

/// Builds [`TwoHosts`] (1 s leases) and waits until h2 follows h1's choices.
pub fn two_hosts() -> TwoHosts {
    two_hosts_leased(1)
}

/// [`two_hosts`] with leases of `lease_s` seconds.
pub fn two_hosts_leased(lease_s: u64) -> TwoHosts {
    let section = |name: &str, host: &str, ep: &str| {
        cluster_section(name, host, ep).replace("lease_s = 1\n", &format!("lease_s = {lease_s}\n"))
    };
    let (lab1, lab2) = (lab(2), lab(2));
    let echoes = |lab: &nsfail::lab::Lab| -> Vec<Echo> {
        lab.encoders
            .iter()
            .map(|e| Echo::start(&e.ns, sa(&format!("{}:9000", e.addr4))))
            .collect()
    };
    let (echoes1, echoes2) = (echoes(&lab1), echoes(&lab2));
    let mut etcd = Etcd::new();
    let (ep1, ep2) = (etcd.link(&lab1.rt.name, 1), etcd.link(&lab2.rt.name, 2));
    etcd.start();
    let name = unique("c");
    let prefix = format!("/nsfail/{name}/");
    let dir = TempDir::new();
    etcd.seed(&dir.path.join("seed.toml"), &two_host_seed(&name));
    let cfg1 = dir.path.join("h1.toml");
    fs::write(
        &cfg1,
        without_channels(&lab_config_with(&lab1, &Policy::tolerant()))
            + &section(&name, "h1", &ep1),
    )
    .unwrap();
    let cfg2 = dir.path.join("h2.toml");
    fs::write(
        &cfg2,
        without_channels(&lab_config_with(&lab2, &Policy::tolerant()))
            .replace("\"enc-a\"", "\"enc-c\"")
            .replace("\"enc-b\"", "\"enc-d\"")
            + &section(&name, "h2", &ep2),
    )
    .unwrap();
    let (pins1, pins2) = (PinDir::new(), PinDir::new());
    let (sock1, sock2) = (dir.path.join("h1.sock"), dir.path.join("h2.sock"));
    let h1 = Daemon::start(&cfg1, &sock1, &pins1);
    let led = wait_for(Duration::from_secs(5), || {
        (cluster_of(&sock1)["leading"] == true).then_some(())
    });
    assert!(led.is_some(), "h1 leads:\n{}", log_of(&cfg1));
    let h2 = Daemon::start(&cfg2, &sock2, &pins2);
    let follows = wait_for(Duration::from_secs(10), || {
        (cluster_of(&sock2)["leader"] == "h1"
            && placement(&sock2)
                == [
                    ("cam1".into(), "enc-a".into()),
                    ("cam2".into(), "enc-c".into()),
                ])
        .then_some(())
    });
    assert!(follows.is_some(), "h2 follows h1:\n{}", log_of(&cfg2));

    TwoHosts {
        h1,
        h2,
        _pins: (pins1, pins2),
        echoes1,
        echoes2,
        sock1,
        sock2,
        cfg1,
        cfg2,
        prefix,
        dir,
        etcd,
        lab1,
        lab2,
    }
}

/// What freezing the leader's host (h1) did.
#[derive(Debug)]
pub struct LeaderFreeze {
    /// Freeze to h2 leading.
    pub elected: Duration,
    /// Freeze to cam1 on h2's enc-c in etcd, written by h2.
    pub moved: Duration,
    /// enc-c killed right after: cam2's stream, 3,000 packets at 1 a ms.
    pub next: NextFailure,
    /// Whether h1, continued, follows h2 with the same placement.
    pub rejoined: bool,
    /// The active/ writes from h1's continuation until 3 s after it rejoined.
    pub after: Vec<(String, serde_json::Value)>,
}

/// A stream whose active encoder died: what it lost and where it ended.
#[derive(Debug)]
pub struct NextFailure {
    pub sent: u32,
    pub lost: u32,
    /// Lost packets times the send interval.
    pub gap_ms: f64,
    /// Whether the stream's last 500 packets arrived at enc-d.
    pub ended_at_d: bool,
    /// cam2's choice in etcd afterwards.
    pub in_etcd: Option<(String, String)>,
}

/// A stream's sequence numbers that reached neither `a` nor `b`, of `0..n`.
fn lost_of(n: u32, a: &BTreeSet<u32>, b: &BTreeSet<u32>) -> u32 {
    (0..n).filter(|s| !a.contains(s) && !b.contains(s)).count() as u32
}

impl TwoHosts {
    /// The leader's host freezes: h1's daemon SIGSTOPped, its link to etcd dropping every
    /// packet at etcd's side, the link up. Waits for h2 to lead and move cam1 (8 s at most
    /// each; `None` when it did not), kills enc-c (cam2's active encoder, on h2) 500 ms into
    /// a stream, then continues h1 and reads what is written to active/ in the next 3 s.
    pub fn freeze_leader(&mut self) -> Result<LeaderFreeze, String> {
        let h1_pid = nix::unistd::Pid::from_raw(self.h1.child.pid());
        let frozen = Instant::now();
        nix::sys::signal::kill(h1_pid, nix::sys::signal::Signal::SIGSTOP)
            .map_err(|e| format!("SIGSTOP h1: {e}"))?;
        let drop_h1 = "add table inet freeze; \
             add chain inet freeze in { type filter hook input priority 0; policy accept; }; \
             add chain inet freeze out { type filter hook output priority 0; policy accept; }; \
             add rule inet freeze in ip saddr 10.79.1.2 drop; \
             add rule inet freeze out ip daddr 10.79.1.2 drop";
        crate::run("ip", &["netns", "exec", &self.etcd.ns.name, "nft", drop_h1]);
        let result = self.while_h1_frozen(frozen);
        let writes_before = self.etcd.history(&format!("{}active/", self.prefix)).len();
        // Continued whatever happened, so that it stops cleanly.
        crate::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.etcd.ns.name,
                "nft",
                "delete table inet freeze",
            ],
        );
        nix::sys::signal::kill(h1_pid, nix::sys::signal::Signal::SIGCONT)
            .map_err(|e| format!("SIGCONT h1: {e}"))?;
        let (elected, moved, next) = result?;
        let rejoined = wait_for(Duration::from_secs(10), || {
            let c = cluster_of(&self.sock1);
            (c["leader"] == "h2"
                && c["leading"] == false
                && placement(&self.sock1) == placement(&self.sock2))
            .then_some(())
        })
        .is_some();
        std::thread::sleep(Duration::from_secs(3));
        let history = self.etcd.history(&format!("{}active/", self.prefix));
        let after = history[writes_before.min(history.len())..]
            .iter()
            .map(|(k, v)| {
                let v = serde_json::from_slice(v).unwrap_or(serde_json::Value::Null);
                (k.clone(), v)
            })
            .collect();
        Ok(LeaderFreeze {
            elected,
            moved,
            next,
            rejoined,
            after,
        })
    }

    fn while_h1_frozen(
        &mut self,
        frozen: Instant,
    ) -> Result<(Duration, Duration, NextFailure), String> {
        let elected = wait_for(Duration::from_secs(8), || {
            (cluster_of(&self.sock2)["leading"] == true).then(|| frozen.elapsed())
        })
        .ok_or_else(|| format!("h2 not elected:\n{}", log_of(&self.cfg2)))?;
        let moved = wait_for(Duration::from_secs(8), || {
            (active_in_etcd(&self.etcd, &self.prefix, "cam1")
                == Some(("enc-c".into(), "h2".into())))
            .then(|| frozen.elapsed())
        })
        .ok_or_else(|| format!("h2 did not move cam1 to enc-c:\n{}", log_of(&self.cfg2)))?;
        let next = self.kill_enc_c(3000, Duration::from_millis(1), Duration::from_millis(500));
        Ok((elected, moved, next))
    }

    /// Sends `n` packets to cam2 every `interval`; `after` in, enc-c dies (its receiver and
    /// health responder stop).
    pub fn kill_enc_c(&mut self, n: u32, interval: Duration, after: Duration) -> NextFailure {
        let (ec, ed) = (&self.lab2.encoders[0], &self.lab2.encoders[1]);
        let mut rx_c = Receiver::start(&ec.ns, sa(&format!("{}:7002", ec.addr4)));
        let rx_d = Receiver::start(&ed.ns, sa(&format!("{}:7002", ed.addr4)));
        let burst = spawn_burst(
            &self.lab2.src.name,
            sa("10.77.0.2:41010"),
            sa("10.77.0.1:5002"),
            0..n,
            interval,
            Duration::from_secs(2),
        );
        std::thread::sleep(after);
        // What enc-c received up to its death counts: read before the receiver goes.
        let on_c = rx_c.seen();
        rx_c.kill();
        self.echoes2[0].stop();
        let sent = burst.join().expect("burst thread");
        let on_c: BTreeSet<u32> = on_c.union(&rx_c.seen()).copied().collect();
        let on_d = rx_d.settled();
        let lost = lost_of(n, &on_c, &on_d);
        NextFailure {
            sent: n,
            lost,
            gap_ms: sent.sending.as_secs_f64() * 1e3 * f64::from(lost) / f64::from(n - 1),
            ended_at_d: (0..n).rev().take(500).all(|s| on_d.contains(&s)),
            in_etcd: active_in_etcd(&self.etcd, &self.prefix, "cam2"),
        }
    }
}

/// What stopping etcd for a while did.
#[derive(Debug)]
pub struct EtcdOutage {
    /// Packets per stream (one every 2 ms, for the outage and 4 s around it).
    pub sent: u32,
    /// cam1 (through h1 to enc-a, which stays up): packets lost.
    pub lost_cam1: u32,
    /// cam2 (enc-c killed during the outage, h2 fails it over to enc-d): packets lost.
    pub lost_cam2: u32,
    /// cam2's lost packets times the send interval.
    pub local_gap_ms: f64,
    /// Whether h2 had cam2 on enc-d within 5 s of enc-c's death, etcd still down.
    pub local_failover: bool,
    /// Whether cam2's last 1,000 packets arrived at enc-d.
    pub ended_at_d: bool,
    /// etcd answering again to both hosts' placements and etcd's active/ keys agreeing
    /// (15 s at most).
    pub agreed: Option<Duration>,
    /// Writes to active/ from the outage's start until 3 s after agreement.
    pub writes: usize,
    /// The writes among them that changed a channel's encoder, in order.
    pub moves: Vec<(String, String)>,
}

impl TwoHosts {
    /// etcd stops (SIGKILL) for `outage` while a stream runs through each host (cam1 through
    /// h1 to enc-a, cam2 through h2 to enc-c); 5 s after both hosts saw etcd lost, enc-c dies.
    /// Then etcd restarts on its data.
    pub fn stop_etcd(&mut self, outage: Duration) -> Result<EtcdOutage, String> {
        let writes_before = self.etcd.history(&format!("{}active/", self.prefix)).len();
        let (ea, ec, ed) = (
            &self.lab1.encoders[0],
            &self.lab2.encoders[0],
            &self.lab2.encoders[1],
        );
        let rx_a = Receiver::start(&ea.ns, sa(&format!("{}:7000", ea.addr4)));
        let mut rx_c = Receiver::start(&ec.ns, sa(&format!("{}:7002", ec.addr4)));
        let rx_d = Receiver::start(&ed.ns, sa(&format!("{}:7002", ed.addr4)));
        let interval = Duration::from_millis(2);
        let n = u32::try_from((outage.as_millis() + 4000) / 2).expect("a short outage");
        let stream = |src: &str, from: &str, to: &str| {
            spawn_burst(
                src,
                sa(from),
                sa(to),
                0..n,
                interval,
                Duration::from_secs(2),
            )
        };
        let cam1 = stream(&self.lab1.src.name, "10.77.0.2:41020", "10.77.0.1:5000");
        let cam2 = stream(&self.lab2.src.name, "10.77.0.2:41021", "10.77.0.1:5002");
        std::thread::sleep(Duration::from_secs(1));
        let stopped = Instant::now();
        self.etcd.kill();
        let lost_etcd = wait_for(Duration::from_secs(6), || {
            let (c1, c2) = (cluster_of(&self.sock1), cluster_of(&self.sock2));
            (c1["etcd"] == false && c2["etcd"] == false && c1["leading"] == false).then_some(())
        });
        std::thread::sleep(Duration::from_secs(5));
        let on_c = rx_c.seen();
        rx_c.kill();
        self.echoes2[0].stop();
        let local_failover = wait_for(Duration::from_secs(5), || {
            placement(&self.sock2)
                .contains(&("cam2".into(), "enc-d".into()))
                .then_some(())
        })
        .is_some();
        std::thread::sleep(outage.saturating_sub(stopped.elapsed()));
        self.etcd.start();
        let back = Instant::now();
        let want = [
            ("cam1".to_owned(), "enc-a".to_owned()),
            ("cam2".to_owned(), "enc-d".to_owned()),
        ];
        let agreed = wait_for(Duration::from_secs(15), || {
            let in_etcd = ["cam1", "cam2"]
                .map(|ch| active_in_etcd(&self.etcd, &self.prefix, ch).map(|a| a.0));
            (placement(&self.sock1) == want
                && placement(&self.sock2) == want
                && in_etcd == [Some("enc-a".into()), Some("enc-d".into())])
            .then(|| back.elapsed())
        });
        let _ = cam1.join().expect("cam1 burst");
        let s2 = cam2.join().expect("cam2 burst");
        lost_etcd.ok_or("the hosts did not both see etcd lost, or h1 did not step down")?;
        let on_a = rx_a.settled();
        let on_c: BTreeSet<u32> = on_c.union(&rx_c.seen()).copied().collect();
        let on_d = rx_d.settled();
        let lost_cam2 = lost_of(n, &on_c, &on_d);
        std::thread::sleep(Duration::from_secs(3));
        let history = self.etcd.history(&format!("{}active/", self.prefix));
        Ok(EtcdOutage {
            sent: n,
            lost_cam1: lost_of(n, &on_a, &BTreeSet::new()),
            lost_cam2,
            local_gap_ms: s2.sending.as_secs_f64() * 1e3 * f64::from(lost_cam2) / f64::from(n - 1),
            local_failover,
            ended_at_d: (0..n).rev().take(1000).all(|s| on_d.contains(&s)),
            agreed,
            writes: history.len().saturating_sub(writes_before),
            moves: moves_since(&history, writes_before),
        })
    }
}

/// The writes from index `since` of an active/ history that changed a channel's encoder (a
/// new term may write a channel's encoder again: that is no move). The channels start where
/// [`two_hosts`] puts them.
fn moves_since(history: &[(String, Vec<u8>)], since: usize) -> Vec<(String, String)> {
    let mut last: BTreeMap<String, String> = [("cam1", "enc-a"), ("cam2", "enc-c")]
        .map(|(c, e)| (c.to_owned(), e.to_owned()))
        .into();
    let mut moves = Vec::new();
    for (i, (k, v)) in history.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(v).unwrap_or_default();
        let (ch, enc) = (
            k.rsplit('/').next().unwrap_or_default(),
            v["encoder"].as_str().unwrap_or_default(),
        );
        if last.insert(ch.to_owned(), enc.to_owned()).as_deref() != Some(enc) && i >= since {
            moves.push((ch.to_owned(), enc.to_owned()));
        }
    }
    moves
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address")
}
