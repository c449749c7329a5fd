//! One daemon per pin directory: an exclusive lock taken before anything is loaded, adopted
//! or changed.

use super::*;

/// Takes the pin directory's lock (held until the process exits) and writes this daemon's
/// PID and socket into it; refuses, naming the daemon that holds it, when another one does.
pub(super) fn lock_pins(pins: &Pins, socket: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = pins.lock_file();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            // What the holder wrote; a read error leaves the message without it.
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "another nsfail daemon serves the data plane at {} ({}); nothing was changed",
                pins.root().display(),
                if holder.is_empty() {
                    format!("it holds {}", path.display())
                } else {
                    holder.to_owned()
                }
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    };
    lock.set_len(0)?;
    lock.rewind()?;
    writeln!(
        lock,
        "pid {}, socket {}",
        std::process::id(),
        socket.display()
    )?;
    Ok(lock)
}
