//! The bpf(2) and socket calls aya does not wrap: a pinned object's descriptor, a link's
//! detach and info, a batched map read, and the network namespace's cookie. Each is one syscall with its
//! `bpf_attr` member spelled out; nothing here knows what nsfail pins.

use std::{io, os::fd::OwnedFd, path::Path};

/// `BPF_OBJ_GET`: a descriptor for the object pinned at `path`.
pub(super) fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_OBJ_GET and outlives the call;
    // the kernel reads `size_of::<ObjGet>()` bytes and treats the rest as zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            size_of::<ObjGet>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `BPF_LINK_DETACH` on a link descriptor.
pub(super) fn bpf_link_detach(link: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let link_fd = link.as_raw_fd() as u32;
    // SAFETY: `link_fd` is the `link_detach` member of `bpf_attr`; it outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &link_fd as *const u32,
            size_of::<u32>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link: the first 32 bytes of its `struct bpf_link_info`.
pub(super) fn bpf_link_info(link: &OwnedFd) -> io::Result<[u8; 32]> {
    use std::os::fd::AsRawFd;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u8; 32];
    let attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is the `info` member of `bpf_attr`; the kernel writes at most
    // `info_len` bytes to `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFd,
            size_of::<InfoByFd>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// `BPF_MAP_LOOKUP_BATCH` on an array map (Linux 5.6): the values of up to `count` entries
/// from index `start` on, into `values` (`count` values of the map's value size, per CPU for a
/// per-CPU map). Returns how many were read; fewer than asked at the end of the array.
pub(super) fn bpf_array_lookup_batch(
    map: &OwnedFd,
    start: u32,
    count: u32,
    values: &mut [u8],
    value_size: usize,
) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    #[repr(C)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    if values.len() < count as usize * value_size {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // The batch position is the last index read: the read goes on after it; none (NULL) is
    // "from the first".
    let in_batch = start.wrapping_sub(1);
    let mut out_batch = 0u32;
    let mut keys = vec![0u32; count as usize];
    let mut attr = Batch {
        in_batch: if start == 0 {
            0
        } else {
            &in_batch as *const u32 as u64
        },
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is the `batch` member of `bpf_attr`; the kernel writes at most `count`
    // keys and `count * value_size` value bytes into buffers that hold that much, the batch
    // position into `out_batch`, and `count` back into `attr`; all outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut Batch,
            size_of::<Batch>() as libc::c_uint,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // ENOENT: the end of the array was reached; `count` says how many were read.
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(attr.count);
        }
        return Err(e);
    }
    Ok(attr.count)
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
pub(super) fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
