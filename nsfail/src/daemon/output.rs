//! A child's output, read without ever stopping: any bytes (invalid UTF-8 is shown with
//! U+FFFD), lines of any length (each logged up to [`MAX_LINE`] bytes), at any rate (at most
//! [`MAX_LINES_PER_SEC`] lines logged a second). What goes beyond is dropped and counted; the
//! first drop is reported once, the total when the reader ends. The reader keeps draining
//! whatever comes, so the child never blocks on a full pipe or dies of SIGPIPE.

use std::time::{Duration, Instant};

use log::{info, warn};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The longest line logged; the rest of a longer line is dropped (and counted).
pub(super) const MAX_LINE: usize = 4096;
/// Lines logged per second; more are dropped (and counted).
pub(super) const MAX_LINES_PER_SEC: u32 = 200;

/// Counts of what was dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dropped {
    /// Bytes beyond [`MAX_LINE`] in a line.
    pub(super) bytes: u64,
    /// Whole lines beyond the rate.
    pub(super) lines: u64,
}

/// Splits a byte stream into bounded lines.
pub(super) struct Lines {
    line: Vec<u8>,
    truncated: bool,
    window: Instant,
    in_window: u32,
    pub(super) dropped: Dropped,
}

impl Lines {
    pub(super) fn new() -> Self {
        Self {
            line: Vec::with_capacity(256),
            truncated: false,
            window: Instant::now(),
            in_window: 0,
            dropped: Dropped::default(),
        }
    }

    /// Takes `bytes`, calling `emit` with each complete line (lossily decoded, `true` when
    /// it was cut at [`MAX_LINE`]) that fits the rate.
    pub(super) fn feed(&mut self, bytes: &[u8], mut emit: impl FnMut(&str, bool)) {
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            let (body, ends) = match piece.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (piece, false),
            };
            let take = body.len().min(MAX_LINE - self.line.len());
            self.line.extend_from_slice(&body[..take]);
            if take < body.len() {
                self.dropped.bytes += (body.len() - take) as u64;
                self.truncated = true;
            }
            if ends {
                self.finish(&mut emit);
            }
        }
    }

    /// Emits what is left of an unfinished line (the stream ended).
    pub(super) fn flush(&mut self, mut emit: impl FnMut(&str, bool)) {
        if !self.line.is_empty() || self.truncated {
            self.finish(&mut emit);
        }
    }

    fn finish(&mut self, emit: &mut impl FnMut(&str, bool)) {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.in_window = 0;
        }
        if self.in_window < MAX_LINES_PER_SEC {
            self.in_window += 1;
            emit(&printable(&self.line), self.truncated);
        } else {
            self.dropped.lines += 1;
        }
        self.line.clear();
        self.truncated = false;
    }
}

/// `line` as text for the log: invalid UTF-8 as U+FFFD, control characters (an escape
/// sequence that would restyle a terminal or be stripped by the logger) escaped as `\u{1b}`.
fn printable(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.into_owned();
    }
    let mut shown = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            shown.extend(c.escape_debug());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// Logs `stream` line by line as `[who] line` until it ends or fails; `first_drop` is called
/// once, when output is first dropped.
pub(super) async fn log_lossy(
    mut stream: impl AsyncRead + Unpin,
    who: &str,
    mut first_drop: impl FnMut(String),
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Lines::new();
    let mut reported = false;
    let emit = |line: &str, cut: bool| {
        if cut {
            info!("[{who}] {line} [cut at {MAX_LINE} bytes]");
        } else {
            info!("[{who}] {line}");
        }
    };
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                warn!("[{who}] reading its output: {e}");
                break;
            }
        };
        lines.feed(&buf[..n], emit);
        if !reported && lines.dropped != Dropped::default() {
            reported = true;
            first_drop(format!(
                "output beyond {MAX_LINE} bytes a line or {MAX_LINES_PER_SEC} lines a second \
                 is dropped (counted; the first drop just now)"
            ));
        }
    }
    lines.flush(emit);
    if lines.dropped != Dropped::default() {
        info!(
            "[{who}] output dropped: {} bytes of over-long lines, {} lines over the rate",
            lines.dropped.bytes, lines.dropped.lines
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<(String, bool)>, Dropped) {
        let mut lines = Lines::new();
        let mut out = Vec::new();
        for c in chunks {
            lines.feed(c, |l, cut| out.push((l.to_owned(), cut)));
        }
        lines.flush(|l, cut| out.push((l.to_owned(), cut)));
        (out, lines.dropped)
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        let (out, dropped) = run(&[b"hel", b"lo\nwor", b"ld\n"]);
        assert_eq!(
            out,
            vec![("hello".to_owned(), false), ("world".to_owned(), false)]
        );
        assert_eq!(dropped, Dropped::default());
    }

    #[test]
    fn invalid_utf8_is_shown_not_fatal() {
        let (out, _) = run(&[b"a\xff\xfeb\n", b"next\n"]);
        assert_eq!(out[0].0, "a\u{fffd}\u{fffd}b");
        assert_eq!(out[1].0, "next");
    }

    #[test]
    fn a_mebibyte_without_a_newline_is_cut_and_counted() {
        let big = vec![b'x'; 1 << 20];
        let (out, dropped) = run(&[&big, b"\nafter\n"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.len(), MAX_LINE);
        assert!(out[0].1, "marked as cut");
        assert_eq!(out[1], ("after".to_owned(), false));
        assert_eq!(dropped.bytes, (1 << 20) - MAX_LINE as u64);
    }

    #[test]
    fn a_flood_of_lines_is_bounded_by_the_rate() {
        let flood = b"x\n".repeat(MAX_LINES_PER_SEC as usize + 50);
        let (out, dropped) = run(&[&flood]);
        assert_eq!(out.len(), MAX_LINES_PER_SEC as usize);
        assert_eq!(dropped.lines, 50);
    }

    #[test]
    fn control_characters_are_escaped() {
        let (out, _) = run(&[b"red \x1b[31mtext\r\tend\n"]);
        assert_eq!(out[0].0, "red \\u{1b}[31mtext\\r\tend");
    }

    #[test]
    fn an_unfinished_last_line_is_flushed() {
        let (out, _) = run(&[b"tail"]);
        assert_eq!(out, vec![("tail".to_owned(), false)]);
    }
}
