//! Managed encoders: nsfail makes the encoder's network namespace, its veth pair (host side in
//! nsfail's namespace, `eth0` inside), the addresses and routes, turns GRO on inside (needed to
//! receive XDP-redirected frames), and supervises the encoder's command inside the namespace.
//! All of it through netlink (rtnetlink) and ioctls, no `ip` commands. Everything made here is
//! removed by [`deprovision`].

use std::{
    fs::{self, File},
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt;
use log::{info, warn};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    sync::watch,
};

use crate::{
    config::{self, Encoder, Restart},
    netns::{netlink, set_gro},
    paths,
};

/// Inside its namespace a managed encoder's interface is always this.
pub const INNER_IF: &str = "eth0";

#[derive(Debug, thiserror::Error)]
#[error("managed encoder {encoder:?}: {what}: {source}")]
pub struct ManagedError {
    encoder: String,
    what: String,
    source: io::Error,
}

/// What a managed encoder's plumbing is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub encoder: String,
    pub netns: String,
    pub host_if: String,
    pub addr: IpAddr,
    pub prefix: u8,
    /// The host side's address: the encoder's gateway.
    pub gateway: IpAddr,
}

impl Plan {
    /// The plan of a managed encoder (`None` for any other).
    pub fn of(e: &Encoder) -> Option<Self> {
        e.spawn.as_ref()?;
        let prefix = e.link_prefix();
        Some(Self {
            encoder: e.name.clone(),
            netns: e.namespace()?,
            host_if: e.host_interface()?,
            addr: e.address,
            prefix,
            gateway: config::managed_link(e.address, prefix).1,
        })
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> ManagedError + '_ {
        let what = what.into();
        move |source| ManagedError {
            encoder: self.encoder.clone(),
            what,
            source,
        }
    }
}

fn nl(e: rtnetlink::Error) -> io::Error {
    io::Error::other(e.to_string())
}

async fn index_of(handle: &Handle, name: &str) -> io::Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(e)),
    }
}

/// Creates the named namespace `ns` (as `ip netns add` does: a bind mount of a new network
/// namespace on /run/netns/NAME) unless it exists.
pub fn create_netns(ns: &str) -> io::Result<()> {
    let path = paths::netns(ns);
    if path.exists() {
        return Ok(());
    }
    fs::create_dir_all(paths::NETNS_DIR)?;
    File::create(&path)?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        mount(
            Some(Path::new("/proc/thread-self/ns/net")),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(io::Error::from)
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?;
    if made.is_err() {
        let _ = fs::remove_file(&path);
    }
    made
}

/// Removes the named namespace `ns` (its interfaces go with it once nothing runs inside).
pub fn delete_netns(ns: &str) -> io::Result<()> {
    let path = paths::netns(ns);
    if !path.exists() {
        return Ok(());
    }
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    fs::remove_file(&path)
}

/// Makes everything a managed encoder needs; what exists already is kept (a restarted daemon
/// finds its encoders' namespaces in place).
pub fn provision(plan: &Plan) -> Result<(), ManagedError> {
    create_netns(&plan.netns).map_err(plan.err("creating its namespace"))?;
    crate::netns::quicken_icmp_errors(&plan.netns)
        .map_err(plan.err("quickening its ICMP errors"))?;
    let p = plan.clone();
    let peer = format!("{}p", plan.host_if);
    let ns_file =
        File::open(paths::netns(&plan.netns)).map_err(plan.err("opening its namespace"))?;
    netlink(None, move |h| {
        Box::pin(async move {
            if index_of(&h, &p.host_if).await?.is_none() {
                h.link()
                    .add(LinkVeth::new(&p.host_if, &peer).build())
                    .execute()
                    .await
                    .map_err(nl)?;
                let peer_index = index_of(&h, &peer)
                    .await?
                    .ok_or_else(|| io::Error::other("veth peer vanished"))?;
                h.link()
                    .set(
                        LinkUnspec::new_with_index(peer_index)
                            .setns_by_fd(ns_file.as_raw_fd())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl)?;
            }
            let host = index_of(&h, &p.host_if)
                .await?
                .ok_or_else(|| io::Error::other("host side veth missing"))?;
            add_address(&h, host, p.gateway, p.prefix).await?;
            h.link()
                .set(LinkUnspec::new_with_index(host).up().build())
                .execute()
                .await
                .map_err(nl)
        })
    })
    .map_err(plan.err("making its veth"))?;

    let p = plan.clone();
    let peer = format!("{}p", plan.host_if);
    netlink(Some(&plan.netns), move |h| {
        Box::pin(async move {
            if let Some(lo) = index_of(&h, "lo").await? {
                h.link()
                    .set(LinkUnspec::new_with_index(lo).up().build())
                    .execute()
                    .await
                    .map_err(nl)?;
            }
            if let Some(i) = index_of(&h, &peer).await? {
                h.link()
                    .set(
                        LinkUnspec::new_with_index(i)
                            .name(INNER_IF.to_owned())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl)?;
            }
            let inner = index_of(&h, INNER_IF)
                .await?
                .ok_or_else(|| io::Error::other("inner veth missing"))?;
            add_address(&h, inner, p.addr, p.prefix).await?;
            h.link()
                .set(LinkUnspec::new_with_index(inner).up().build())
                .execute()
                .await
                .map_err(nl)?;
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(unspecified(p.addr), 0)
                .and_then(|r| r.gateway(p.gateway))
                .map_err(io::Error::other)?
                .output_interface(inner)
                .build();
            match h.route().add(route).execute().await {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
                other => other.map_err(nl),
            }
        })
    })
    .map_err(plan.err("addressing it inside its namespace"))?;

    let ns = plan.netns.clone();
    crate::netns::in_netns(&ns, || set_gro(INNER_IF, true))
        .and_then(|r| r)
        .map_err(plan.err("turning GRO on inside (needed for XDP redirect into a veth)"))?;
    info!(
        "managed encoder {}: namespace {}, veth {} <-> {INNER_IF} {}/{} via {}",
        plan.encoder, plan.netns, plan.host_if, plan.addr, plan.prefix, plan.gateway
    );
    Ok(())
}

fn unspecified(addr: IpAddr) -> IpAddr {
    if addr.is_ipv4() {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    }
}

async fn add_address(h: &Handle, index: u32, addr: IpAddr, prefix: u8) -> io::Result<()> {
    match h.address().add(index, addr, prefix).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other.map_err(nl),
    }
}

/// Removes a managed encoder's veth and namespace.
pub fn deprovision(plan: &Plan) -> Result<(), ManagedError> {
    let host_if = plan.host_if.clone();
    netlink(None, move |h| {
        Box::pin(async move {
            if let Some(i) = index_of(&h, &host_if).await? {
                h.link().del(i).execute().await.map_err(nl)?;
            }
            Ok(())
        })
    })
    .map_err(plan.err("removing its veth"))?;
    delete_netns(&plan.netns).map_err(plan.err("removing its namespace"))?;
    info!(
        "managed encoder {}: namespace and veth removed",
        plan.encoder
    );
    Ok(())
}

/// Something the supervisor has to say, for the event log.
pub type Report = Arc<dyn Fn(&str, String) + Send + Sync>;

/// Runs a managed encoder's command inside its namespace until `stop` turns true, restarting
/// it with exponential backoff (0.5 s doubling to 30 s, back to 0.5 s after 10 s of running)
/// when `restart = "always"`. Its stdout and stderr go to the log, line by line.
pub async fn supervise(e: Encoder, mut stop: watch::Receiver<bool>, report: Report) {
    let Some(spawn) = e.spawn.clone() else { return };
    let ns = e.namespace().unwrap_or_default();
    let mut backoff = Duration::from_millis(500);
    loop {
        let handle = match File::open(paths::netns(&ns)) {
            Ok(f) => f,
            Err(err) => {
                report(&e.name, format!("namespace {ns} missing: {err}"));
                return;
            }
        };
        let mut cmd = Command::new(&spawn.command);
        cmd.args(&spawn.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only setns (async-signal-safe) runs between fork and exec; the namespace
        // file was opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                setns(handle.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(err) => {
                report(&e.name, format!("cannot start {}: {err}", spawn.command));
                if e.restart == Restart::Never || wait_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        info!(
            "managed encoder {}: started {} (pid {:?})",
            e.name,
            spawn.command,
            child.id()
        );
        for (stream, name) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                "stdout",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                "stderr",
            ),
        ] {
            let Some(stream) = stream else { continue };
            let who = e.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    info!("[{who} {name}] {line}");
                }
            });
        }
        let status = tokio::select! {
            status = child.wait() => status,
            () = stopped(&mut stop) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                info!("managed encoder {}: stopped", e.name);
                return;
            }
        };
        let ran = started.elapsed();
        let status = status.map_or_else(|err| err.to_string(), |s| s.to_string());
        if e.restart == Restart::Never {
            report(
                &e.name,
                format!("process exited ({status}); restart = never"),
            );
            return;
        }
        if ran > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
        }
        report(
            &e.name,
            format!(
                "process exited ({status}); restarting in {} ms",
                backoff.as_millis()
            ),
        );
        if wait_or_stop(&mut stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Sleeps `d`; true if `stop` turned true meanwhile.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        () = stopped(stop) => true,
    }
}

/// Resolves once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Logs a failed deprovision: the operator may have to remove the namespace by hand.
pub fn deprovision_or_warn(plan: &Plan) {
    if let Err(err) = deprovision(plan) {
        warn!("{err} (remove it with `ip netns del {}`)", plan.netns);
    }
}
