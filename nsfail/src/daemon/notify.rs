//! systemd's readiness protocol (sd_notify(3)), hand-written: one datagram to the socket in
//! `$NOTIFY_SOCKET` per state. READY=1 once the data plane is attached and the control socket
//! serves; RELOADING=1 and READY=1 around a reload; WATCHDOG=1 from the controller's own
//! thread, so a wedged controller misses it and is restarted while the pinned data plane
//! keeps forwarding; STOPPING=1. Not under systemd (no `$NOTIFY_SOCKET`), nothing is sent.

use std::{
    env, io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{ffi::OsStringExt as _, net::UnixDatagram},
    },
    path::PathBuf,
    time::Duration,
};

use log::{debug, warn};

/// Where notifications go, read from the environment once at start.
#[derive(Clone, Debug, Default)]
pub(super) struct Notifier {
    target: Option<Target>,
    /// Whether the last send failed: a failure is logged once, not at every watchdog ping.
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone, Debug)]
enum Target {
    Path(PathBuf),
    /// `@name`: a socket in the abstract namespace.
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`, and removes them (with `WATCHDOG_PID`)
    /// from the environment, so that managed encoders' processes do not notify in nsfail's
    /// name. Returns the notifier and how often to send WATCHDOG=1 (half the timeout).
    ///
    /// # Safety
    /// Changes the environment: call before any other thread exists.
    pub(super) unsafe fn from_env() -> (Self, Option<Duration>) {
        let target = env::var_os("NOTIFY_SOCKET").map(|s| {
            let bytes = s.into_vec();
            match bytes.strip_prefix(b"@") {
                Some(name) => Target::Abstract(name.to_vec()),
                None => Target::Path(PathBuf::from(std::ffi::OsString::from_vec(bytes))),
            }
        });
        let for_us = env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog = env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(|usec| Duration::from_micros(usec / 2));
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            // SAFETY: the caller guarantees no other thread reads the environment now.
            unsafe { env::remove_var(var) };
        }
        let watchdog = watchdog.filter(|_| target.is_some());
        let notifier = Self {
            target,
            failing: Default::default(),
        };
        (notifier, watchdog)
    }

    /// Sends `state` (`READY=1`, ...); a failure is logged, never fatal: the daemon works
    /// the same without its supervisor hearing from it.
    pub(super) fn send(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        use std::sync::atomic::Ordering::Relaxed;
        match send_to(target, state) {
            Err(e) if !self.failing.swap(true, Relaxed) => {
                warn!("telling systemd {state:?}: {e} (said once until it works again)")
            }
            Err(e) => debug!("telling systemd {state:?}: {e}"),
            Ok(()) => {
                if self.failing.swap(false, Relaxed) {
                    warn!("telling systemd works again");
                }
                debug!("told systemd {state:?}");
            }
        }
    }
}

fn send_to(target: &Target, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    match target {
        Target::Path(path) => socket.send_to(state.as_bytes(), path)?,
        Target::Abstract(name) => {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?
        }
    };
    Ok(())
}
