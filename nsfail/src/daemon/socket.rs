//! The control socket: binding it (0600 from the start; 0660 with `daemon.socket_group`),
//! checking who is on the other end (root may do everything, the socket group the read-only
//! commands, nobody else anything), one connection's requests, and running each against the
//! controller.

use std::{
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileTypeExt as _, MetadataExt as _},
    },
    sync::atomic::{AtomicU64, Ordering},
};

use nix::unistd::{Gid, Group};

use super::{actor::ControlHandle, *};
use crate::api::Command;

/// Connections refused a request for want of permission, since the daemon started.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// `daemon.socket_group`, resolved: a numeric ID or a group name.
pub(super) fn resolve_group(spec: &str) -> Result<Gid> {
    if let Ok(id) = spec.parse::<u32>() {
        return Ok(Gid::from_raw(id));
    }
    match Group::from_name(spec) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => bail!("daemon.socket_group: there is no group {spec:?}"),
        Err(e) => bail!("daemon.socket_group {spec:?}: {e}"),
    }
}

/// Binds the socket: mode 0600, or 0660 owned by `group`. A socket file nobody answers on is
/// stale and replaced; one that answers belongs to a running daemon, and this one refuses to
/// start; anything else at that path (a file, a directory) is left alone and refused.
pub(super) async fn bind(socket: &Path, group: Option<Gid>) -> Result<UnixListener> {
    if let Some(dir) = socket.parent()
        && !dir.exists()
    {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    match fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(socket).await.is_ok() {
                bail!("another nsfail daemon is serving {}", socket.display());
            }
            fs::remove_file(socket)
                .with_context(|| format!("removing stale {}", socket.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; not removing it (move it away or choose another \
             --socket)",
            socket.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", socket.display())),
    }
    // Created 0600: there is no moment at which another user could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("binding {}", socket.display()))?;
    match group {
        None => fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?,
        Some(gid) => {
            nix::unistd::chown(socket, None, Some(gid))
                .with_context(|| format!("giving {} to group {gid}", socket.display()))?;
            fs::set_permissions(socket, fs::Permissions::from_mode(0o660))?;
            warn_if_unreachable(socket, gid);
        }
    }
    Ok(listener)
}

/// The socket group's members need to pass through the socket's directory.
fn warn_if_unreachable(socket: &Path, gid: Gid) {
    let Some(dir) = socket.parent() else { return };
    let Ok(m) = fs::metadata(dir) else { return };
    let mode = m.mode();
    if mode & 0o001 == 0 && !(mode & 0o010 != 0 && m.gid() == gid.as_raw()) {
        warn!(
            "members of group {gid} cannot reach {}: {} is mode {:o}, group {}",
            socket.display(),
            dir.display(),
            mode & 0o7777,
            m.gid()
        );
    }
}

/// What a peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    All,
    ReadOnly,
    Nothing,
}

/// The commands the socket group may run: they change nothing.
fn read_only(command: &Command) -> bool {
    matches!(command, Command::Status | Command::Events)
}

/// The peer's supplementary groups, as the kernel recorded them at connect (SO_PEERGROUPS).
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes long and outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 65536 {
            groups.resize(n, 0);
            continue;
        }
        return Err(err);
    }
}

/// Who is connected and what they may do, for the log and the error answers.
struct Peer {
    uid: u32,
    pid: Option<i32>,
    access: Access,
}

fn peer_of(stream: &UnixStream, group: Option<Gid>) -> Peer {
    let Ok(cred) = stream.peer_cred() else {
        return Peer {
            uid: u32::MAX,
            pid: None,
            access: Access::Nothing,
        };
    };
    let access = if cred.uid() == 0 {
        Access::All
    } else if let Some(gid) = group
        && (cred.gid() == gid.as_raw()
            || peer_groups(stream).is_ok_and(|g| g.contains(&gid.as_raw())))
    {
        Access::ReadOnly
    } else {
        Access::Nothing
    };
    Peer {
        uid: cred.uid(),
        pid: cred.pid(),
        access,
    }
}

/// Why `peer` may not run `command`, if it may not; counted and logged.
fn refusal(peer: &Peer, command: &Command, group: Option<Gid>) -> Option<String> {
    let allowed = match peer.access {
        Access::All => true,
        Access::ReadOnly => read_only(command),
        Access::Nothing => false,
    };
    if allowed {
        return None;
    }
    let n = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    warn!(
        "control socket: refused a request of uid {} (pid {}): {} ({n} refused since start)",
        peer.uid,
        peer.pid.map_or("?".into(), |p| p.to_string()),
        if peer.access == Access::ReadOnly {
            "a change by a member of the socket group"
        } else {
            "neither root nor in the socket group"
        }
    );
    Some(match (peer.access, group) {
        (Access::ReadOnly, _) => format!(
            "permission denied: uid {} may only run status and events (changes are root's)",
            peer.uid
        ),
        (_, Some(gid)) => format!(
            "permission denied: uid {} is neither root nor in group {gid} (daemon.socket_group)",
            peer.uid
        ),
        (_, None) => format!(
            "permission denied: uid {} is not root (daemon.socket_group can open status and \
             events to a group)",
            peer.uid
        ),
    })
}

/// Serves one connection: requests one per line until the client closes. A malformed or
/// oversized request gets an error answer; an oversized one also ends the connection, and so
/// does a refused one from a peer that may do nothing.
pub(super) async fn handle(
    stream: UnixStream,
    ctl: ControlHandle,
    group: Option<Gid>,
    writes: Option<Arc<super::cluster::Writes>>,
) -> Result<()> {
    let peer = peer_of(&stream, group);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(api::MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > api::MAX_REQUEST;
        let mut refused = false;
        let mut response = if too_long {
            Response::error(format!("request longer than {} bytes", api::MAX_REQUEST))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) if req.v != api::VERSION => Response::error(format!(
                    "protocol version {} not supported (this daemon speaks {})",
                    req.v,
                    api::VERSION
                )),
                Ok(req) => match refusal(&peer, &req.command, group) {
                    Some(why) => {
                        refused = peer.access == Access::Nothing;
                        Response::error(why)
                    }
                    None => {
                        let through_etcd = match &writes {
                            Some(w) => w.intercept(&req.command, &ctl).await,
                            None => None,
                        };
                        match through_etcd {
                            Some(answer) => answer,
                            None => ctl.request(req.command).await,
                        }
                    }
                },
                Err(e) => Response::error(format!("malformed request: {e}")),
            }
        };
        // The answer's JSON (tens of MB for a `status` of 100,000 channels) is written as
        // it is, after the rest of the response, rather than copied into it: `data` is the
        // last field, so the bytes are those serde would write.
        let data = response.data.take();
        let mut out = serde_json::to_vec(&response)?;
        if let Some(data) = data {
            let close = out.pop();
            debug_assert_eq!(close, Some(b'}'), "a response serializes as a JSON object");
            out.extend_from_slice(b",\"data\":");
            write.write_all(&out).await?;
            write.write_all(data.get().as_bytes()).await?;
            out.clear();
            out.push(b'}');
        }
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long || refused {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nsfail-sock-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn the_stale_socket_path_removes_only_a_socket() {
        let dir = scratch("stale");
        // A regular file where the socket should be: refused, left as it is.
        let file = dir.join("file.sock");
        fs::write(&file, "keep me").unwrap();
        let err = bind(&file, None).await.unwrap_err().to_string();
        assert!(err.contains("is not a socket; not removing it"), "{err}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");
        // A directory: the same.
        let sub = dir.join("dir.sock");
        fs::create_dir(&sub).unwrap();
        assert!(bind(&sub, None).await.is_err());
        assert!(sub.is_dir());
        // A socket nobody answers on: replaced, 0600.
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let listener = bind(&stale, None).await.unwrap();
        let mode = fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // One that answers: refused, kept.
        let err = bind(&stale, None).await.unwrap_err().to_string();
        assert!(err.contains("another nsfail daemon"), "{err}");
        drop(listener);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_status_and_events_are_read_only() {
        assert!(read_only(&Command::Status));
        assert!(read_only(&Command::Events));
        assert!(!read_only(&Command::Drain {
            encoder: "e".into()
        }));
        assert!(!read_only(&Command::RemoveEncoder { name: "e".into() }));
    }
}
