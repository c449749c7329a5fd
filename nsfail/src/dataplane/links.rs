//! Links: pinning them, detaching them whoever holds them, telling a live link from one left
//! behind by a deleted interface, and the redirect tracepoints' links and configuration.
//!
//! aya (0.14) pins links (`FdLink::pin`) and we use it for that; it cannot do the other two:
//! `PinnedLink::from_pin` gives an `FdLink` whose `detach` only closes our descriptor (a
//! link held by anyone else stays attached), and its `LinkInfo` carries no interface index.
//! Those two go through `sys` (`BPF_LINK_DETACH`, `BPF_OBJ_GET_INFO_BY_FD`).

use std::{fs, io, path::Path};

use aya::programs::{RawTracePoint, links::FdLink};
use log::warn;
use nsfail_common::TraceConfig;

use super::{DataplaneError, Result, prog_err, sys};
use crate::paths::Pins;

/// The redirect tracepoints: (program, kernel tracepoint).
pub(super) const TRACEPOINTS: [(&str, &str); 2] = [
    ("nsfail_devmap_xmit", "xdp_devmap_xmit"),
    ("nsfail_redirect_err", "xdp_redirect_err"),
];

/// Detaches the link pinned at `path` now and removes the pin.
///
/// Closing the last descriptor is not enough: a process forked by any thread at that moment
/// holds a copy of every descriptor until it execs, which would keep the link attached and
/// make an attach that follows fail with EEXIST. `BPF_LINK_DETACH` detaches whoever holds it.
pub(super) fn detach_pinned_link(path: &Path) -> Result<()> {
    let pin_err = |source: io::Error| DataplaneError::Pin {
        path: path.display().to_string(),
        source,
    };
    match sys::bpf_obj_get(path) {
        // A link whose device went away with its namespace detaches again without error.
        Ok(fd) => match sys::bpf_link_detach(&fd) {
            // Tracepoint links have no detach: unpinning ends them once nobody holds them.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => warn!("{}: detach: {e}; unpinning it", path.display()),
            Ok(()) => {}
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => warn!("{}: {e}; removing the pin", path.display()),
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(pin_err(e)),
        _ => Ok(()),
    }
}

/// Whether the link pinned at `pin` is attached to interface `ifindex`. A pinned link that
/// is attached nowhere (its interface was deleted) or to another interface (one re-created
/// under the same name has a new index) is detached and unpinned, so that the caller attaches
/// afresh.
pub(super) fn live_link(pin: &Path, ifindex: u32) -> Result<bool> {
    match link_ifindex(pin)? {
        None => Ok(false),
        Some(i) if i == ifindex => Ok(true),
        Some(i) => {
            warn!(
                "{}: attached to interface index {i}, not {ifindex} (the interface was \
                 re-created): replacing it",
                pin.display()
            );
            detach_pinned_link(pin)?;
            Ok(false)
        }
    }
}

/// Whether the link pinned at `pin` is attached to the interface named `ifname` now.
pub(super) fn pinned_to(pin: &Path, ifname: &str) -> Result<bool> {
    match crate::net::netns::link(ifname) {
        Ok(link) => Ok(link_ifindex(pin)? == Some(link.ifindex)),
        Err(_) => Ok(false),
    }
}

/// The interface index an XDP or TCX link pinned at `pin` is attached to (0 once its
/// interface is gone), or `None` when nothing is pinned there.
pub(super) fn link_ifindex(pin: &Path) -> Result<Option<u32>> {
    let fd = match sys::bpf_obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DataplaneError::Pin {
                path: pin.display().to_string(),
                source,
            });
        }
    };
    let info = sys::bpf_link_info(&fd).map_err(|source| DataplaneError::Pin {
        path: pin.display().to_string(),
        source,
    })?;
    // `struct bpf_link_info`: type, id, prog_id, padding, then the per-type union, whose
    // `xdp.ifindex` and `tcx.ifindex` both come first.
    Ok(Some(u32::from_ne_bytes([
        info[16], info[17], info[18], info[19],
    ])))
}

/// What the redirect tracepoints need: this namespace's cookie, the DEVMAP's id, and the
/// struct offsets of the running kernel.
pub(super) fn trace_config_for(devmap_id: u32) -> std::result::Result<TraceConfig, String> {
    let btf = super::btf::Btf::kernel().map_err(|e| e.to_string())?;
    let offset = |s: &str, m: &str| btf.offset(s, m).map_err(|e| e.to_string());
    Ok(TraceConfig {
        netns_cookie: sys::netns_cookie().map_err(|e| format!("network namespace cookie: {e}"))?,
        devmap_id,
        off_ifindex: offset("net_device", "ifindex")?,
        off_nd_net: offset("net_device", "nd_net.net")?,
        off_net_cookie: offset("net", "net_cookie")?,
    })
}

/// Attaches each redirect tracepoint whose link is not pinned yet, and pins its link.
pub(super) fn attach_tracepoints(pins: &Pins) -> Result<()> {
    for (prog, tracepoint) in TRACEPOINTS {
        let pin = pins.trace_link(tracepoint);
        if pin.exists() {
            continue;
        }
        let mut tp = RawTracePoint::from_pin(pins.prog(prog)).map_err(prog_err(prog))?;
        let id = tp.attach(tracepoint).map_err(prog_err(prog))?;
        let link: FdLink = tp.take_link(id).map_err(prog_err(prog))?.into();
        pin_link(link, &pin)?;
    }
    Ok(())
}

pub(super) fn pin_link(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path).map_err(|e| DataplaneError::Pin {
        path: path.display().to_string(),
        source: io::Error::other(e),
    })?;
    Ok(())
}
