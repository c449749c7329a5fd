//! The machine side of the benchmarks: namespaces and veths the bench owns, CPU pinning, CPU
//! time from /proc/stat, threaded NAPI, the monotonic clock.

use std::{
    collections::BTreeSet,
    fs, io,
    mem::{size_of, zeroed},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    time::{ClockId, clock_gettime},
    unistd::Pid,
};
use nsfail::{lab::Netns, net::netns};
use nsfail_tests::unique;

/// The core that generates traffic; the other one (`ROUTER_CPU`) does the work under test.
pub const GENERATOR_CPU: usize = 0;
pub const ROUTER_CPU: usize = 1;

/// A namespace made for one benchmark (uniquely named, deleted with its veths on drop),
/// without IPv6: its neighbour discovery and MLD would reach the sinks and be counted.
pub fn namespace(prefix: &str) -> Result<Netns> {
    let ns =
        Netns::new(&unique(prefix)).with_context(|| format!("creating a {prefix} namespace"))?;
    for scope in ["all", "default"] {
        ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{scope}.disable_ipv6=1")],
        )?;
    }
    Ok(ns)
}

/// A veth pair `a`/`b` inside `ns`, both ends up (moved to `b_ns` first, when given).
pub fn veth(ns: &Netns, a: &str, b: &str, b_ns: Option<&Netns>) -> Result<()> {
    ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
    if let Some(other) = b_ns {
        ns.ip(&["link", "set", b, "netns", &other.name])?;
        other.ip(&["link", "set", b, "up"])?;
    } else {
        ns.ip(&["link", "set", b, "up"])?;
    }
    ns.ip(&["link", "set", a, "up"])?;
    Ok(())
}

/// An interface's index and MAC inside `ns`.
pub fn link(ns: &Netns, ifname: &str) -> Result<netns::Link> {
    netns::link_in(Some(&ns.name), ifname).with_context(|| format!("{ifname} in {}", ns.name))
}

/// Pins the calling thread to `cpu`.
pub fn pin_self(cpu: usize) -> Result<()> {
    pin(0, &[cpu])
}

/// Lets the calling thread run on every CPU again.
pub fn unpin_self() -> Result<()> {
    let cpus: Vec<usize> = (0..online_cpus()).collect();
    pin(0, &cpus)
}

fn pin(pid: i32, cpus: &[usize]) -> Result<()> {
    let mut set = CpuSet::new();
    for cpu in cpus {
        set.set(*cpu).context("CPU number")?;
    }
    sched_setaffinity(Pid::from_raw(pid), &set).with_context(|| format!("pinning {pid}"))
}

pub fn online_cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Busy and total time of one CPU so far, from /proc/stat, in nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct CpuTime {
    pub busy_ns: u64,
    pub total_ns: u64,
}

impl CpuTime {
    pub fn read(cpu: usize) -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let label = format!("cpu{cpu}");
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(label.as_str()))
            .with_context(|| format!("no {label} in /proc/stat"))?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ns = |t: u64| t * 1_000_000_000 / hz;
        Ok(Self {
            busy_ns: ns(total - idle),
            total_ns: ns(total),
        })
    }

    pub fn since(self, earlier: Self) -> Self {
        Self {
            busy_ns: self.busy_ns.saturating_sub(earlier.busy_ns),
            total_ns: self.total_ns.saturating_sub(earlier.total_ns),
        }
    }
}

/// Puts `ifname`'s NAPI into a kernel thread of its own (threaded NAPI) and pins every such
/// thread to `cpu`. The interface must already have NAPI (an XDP program, or GRO on a veth).
pub fn threaded_napi(ns: &Netns, ifname: &str, cpu: usize) -> Result<Vec<i32>> {
    let before = napi_threads()?;
    let path = format!("/sys/class/net/{ifname}/threaded");
    // `ip netns exec` mounts the namespace's own /sys, where the interface is visible.
    ns.exec("sh", &["-c", &format!("echo 1 > {path}")])?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let prefix = format!("napi/{ifname}-");
    loop {
        let new: Vec<(i32, String)> = napi_threads()?
            .into_iter()
            .filter(|(pid, comm)| {
                !before.iter().any(|(p, _)| p == pid)
                    && (comm.starts_with(&prefix) || prefix.starts_with(comm.as_str()))
            })
            .collect();
        if !new.is_empty() {
            let pids: Vec<i32> = new.iter().map(|(p, _)| *p).collect();
            for pid in &pids {
                pin(*pid, &[cpu])?;
            }
            return Ok(pids);
        }
        if Instant::now() > deadline {
            bail!("no NAPI kernel thread appeared for {ifname} in {}", ns.name);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Kernel threads named `napi/...`: (pid, comm).
fn napi_threads() -> Result<BTreeSet<(i32, String)>> {
    threads(|comm| comm.starts_with("napi/"))
}

/// The thread that runs CPU `cpu`'s softirqs when they are deferred.
pub fn ksoftirqd(cpu: usize) -> Result<i32> {
    let name = format!("ksoftirqd/{cpu}");
    threads(|comm| comm == name)?
        .into_iter()
        .next()
        .map(|(pid, _)| pid)
        .with_context(|| format!("no {name} thread"))
}

/// Processes whose name passes `keep`: (pid, comm).
fn threads(keep: impl Fn(&str) -> bool) -> Result<BTreeSet<(i32, String)>> {
    let mut out = BTreeSet::new();
    for entry in fs::read_dir("/proc").context("reading /proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(comm) = fs::read_to_string(entry.path().join("comm")) {
            let comm = comm.trim();
            if keep(comm) {
                out.insert((pid, comm.to_owned()));
            }
        }
    }
    Ok(out)
}

/// Time thread `tid` has run on a CPU, in nanoseconds (schedstat: exact, unlike /proc/stat
/// ticks, and only this thread's, whatever else runs on the CPU). Without IRQ time
/// accounting it includes the softirqs the thread ran itself.
pub fn thread_runtime_ns(tid: i32) -> Result<u64> {
    let path = format!("/proc/{tid}/schedstat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{path}: {text:?}"))
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// A permanent neighbour entry, so that the kernel paths never need ARP (the sinks drop it).
pub fn static_neighbour(ns: &Netns, addr: Ipv4Addr, mac: [u8; 6], dev: &str) -> Result<()> {
    ns.ip(&[
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        &mac_string(mac),
        "dev",
        dev,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

/// One `mmsghdr` per iovec, each pointing at its own. The iovecs must stay where they are
/// for as long as the headers are used; change them through the headers (`msg_iov`).
pub fn mmsg_headers(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    let base = iovs.as_mut_ptr();
    (0..iovs.len())
        .map(|i| {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { zeroed() };
            // SAFETY: i < iovs.len().
            m.msg_hdr.msg_iov = unsafe { base.add(i) };
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

/// Sets the integer socket option `name` at `level` on `sock`.
pub fn setsockopt_int(
    sock: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads an int of the given size from a valid pointer.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `uname -r`, for the report.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
