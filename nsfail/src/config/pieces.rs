//! The config's parse in pieces. The `toml` crate builds a whole document's tokens, events and
//! spanned values before it deserializes any of it: for 100,000 channels (13 MB of TOML) that
//! tree took 300 MiB, the daemon's peak. So the text is cut before its `[[channel]]` headers:
//! the channels are parsed a run of [`CHANNELS_PER_PIECE`] at a time, and the rest of the
//! document (with each channel's lines left blank) on its own; only one piece's tree exists
//! at a time.
//!
//! A `[[channel]]` section only ever defines keys of its own array element, so the pieces mean
//! what the whole does, as long as nothing else in the file names `channel`. Wherever the cut
//! cannot be sure (a `channel` key elsewhere, any other spelling of the header, a piece that
//! does not parse), [`parse`] gives up and the whole document is parsed as before: that parse
//! makes every error, so errors read, and locate, exactly as they always did.

use serde::de::IgnoredAny;

use super::*;

/// Channels per piece: a piece's tree is then a few MB.
pub(super) const CHANNELS_PER_PIECE: usize = 1000;

/// Everything in the file but its `[[channel]]` sections.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rest {
    ingest: Ingest,
    #[serde(rename = "encoder", default)]
    encoders: Vec<Encoder>,
    /// Present only when something besides the `[[channel]]` sections names `channel`.
    #[serde(rename = "channel", default)]
    channels: Option<IgnoredAny>,
    #[serde(default)]
    daemon: DaemonSettings,
    #[serde(default)]
    cluster: Option<Cluster>,
}

/// A run of `[[channel]]` sections.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Piece {
    #[serde(rename = "channel")]
    channels: Vec<Channel>,
}

/// The config in `text`, parsed `per_piece` channels at a time; `None` when the text has no
/// `[[channel]]` header, or anything the pieces cannot be sure of (then parse it whole).
pub(super) fn parse(text: &str, per_piece: usize) -> Option<Config> {
    let headers = headers(text)?;
    let count = headers.iter().filter(|h| h.channel).count();
    if count == 0 {
        return None;
    }
    let mut rest = String::new();
    let mut pieces: Vec<Range<usize>> = Vec::new();
    let mut in_piece = 0;
    rest.push_str(&text[..headers[0].start]);
    for (i, h) in headers.iter().enumerate() {
        let end = headers.get(i + 1).map_or(text.len(), |next| next.start);
        let section = h.start..end;
        if !h.channel {
            rest.push_str(&text[section]);
            in_piece = 0;
            continue;
        }
        // Blank lines keep the rest's line numbers those of the file.
        let lines = text[section.clone()]
            .bytes()
            .filter(|&b| b == b'\n')
            .count();
        rest.extend(std::iter::repeat_n('\n', lines));
        match pieces.last_mut() {
            Some(piece) if in_piece > 0 && in_piece < per_piece && piece.end == section.start => {
                piece.end = section.end;
                in_piece += 1;
            }
            _ => {
                pieces.push(section);
                in_piece = 1;
            }
        }
    }
    let rest: Rest = toml::from_str(&rest).ok()?;
    if rest.channels.is_some() {
        return None;
    }
    let mut channels = Vec::with_capacity(count);
    for piece in pieces {
        let piece: Piece = toml::from_str(&text[piece]).ok()?;
        channels.extend(piece.channels);
    }
    Some(Config {
        ingest: rest.ingest,
        encoders: rest.encoders,
        channels,
        daemon: rest.daemon,
        cluster: rest.cluster,
    })
}

/// A top-level table header: where its line starts, and whether it is `[[channel]]` as such.
struct Header {
    start: usize,
    channel: bool,
}

/// The top-level table headers of `text`: lines whose first non-blank character is `[`
/// outside any string, comment, array or inline table. `None` when the text ends inside one
/// (not TOML: the whole parse says why).
fn headers(text: &str) -> Option<Vec<Header>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let mut line = Some(0);
    while i < b.len() {
        if let Some(start) = line.take() {
            while i < b.len() && matches!(b[i], b' ' | b'\t') {
                i += 1;
            }
            if depth == 0 && b.get(i) == Some(&b'[') {
                let end = eol(b, i);
                out.push(Header {
                    start,
                    channel: is_channel_header(&text[i..end]),
                });
                i = end;
            }
            continue;
        }
        match b[i] {
            b'\n' => {
                i += 1;
                line = Some(i);
            }
            b'#' => i = eol(b, i),
            b'"' => i = string_end(b, i, b'"', true)?,
            b'\'' => i = string_end(b, i, b'\'', false)?,
            b'[' | b'{' => {
                depth += 1;
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                i += 1;
            }
            _ => i += 1,
        }
    }
    (depth == 0).then_some(out)
}

/// The offset of the newline ending the line `i` is on (or the end of the text).
fn eol(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |n| i + n)
}

/// `[[channel]]`, then nothing but blanks or a comment.
fn is_channel_header(line: &str) -> bool {
    line.strip_prefix("[[channel]]").is_some_and(|after| {
        let after = after.trim_start_matches([' ', '\t', '\r']);
        after.is_empty() || after.starts_with('#')
    })
}

/// The offset just past the string that starts at `i` (a `quote`, or three for a multi-line
/// string); `escapes` for basic strings. `None` when it does not end.
fn string_end(b: &[u8], i: usize, quote: u8, escapes: bool) -> Option<usize> {
    let triple = [quote; 3];
    if b[i..].starts_with(&triple) {
        let mut j = i + 3;
        while j < b.len() {
            if escapes && b[j] == b'\\' {
                j += 2;
            } else if b[j..].starts_with(&triple) {
                j += 3;
                // Up to two more quotes belong to the string: `""""` ends with one.
                for _ in 0..2 {
                    if b.get(j) == Some(&quote) {
                        j += 1;
                    }
                }
                return Some(j);
            } else {
                j += 1;
            }
        }
        return None;
    }
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if escapes => j += 2,
            b'\n' => return None,
            c if c == quote => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "[ingest]\ninterface = \"eth0\"\n\n\
        [[encoder]]\nname = \"a\"\naddress = \"10.0.0.2\"\nhealth = { kind = \"udp\", port = 9 }\n\n";

    fn channel(i: usize) -> String {
        format!(
            "[[channel]]\nname = \"c{i}\"\nlisten = \"10.9.0.{i}:5000\"\nencoders = [\"a\"]\n\n"
        )
    }

    /// The pieces make what the whole parse makes, or give way to it.
    fn same_as_whole(text: &str) -> Option<Config> {
        let whole: Option<Config> = toml::from_str(text).ok();
        for per_piece in [1, 2, 1000] {
            let pieces = parse(text, per_piece);
            if let Some(pieces) = &pieces {
                assert_eq!(Some(pieces), whole.as_ref(), "{text}");
            }
        }
        parse(text, 2)
    }

    #[test]
    fn channels_come_in_file_order_whatever_the_pieces() {
        let text = HEAD.to_owned() + &(1..=5).map(channel).collect::<String>();
        let cfg = same_as_whole(&text).expect("parsed in pieces");
        let names: Vec<&str> = cfg.channels.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["c1", "c2", "c3", "c4", "c5"]);
    }

    #[test]
    fn sections_between_and_after_channels_stay_in_the_rest() {
        let text = format!(
            "{HEAD}{}[[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\n\n{}[daemon]\nevents_keep = 2\n",
            channel(1),
            channel(2)
        );
        let cfg = same_as_whole(&text).expect("parsed in pieces");
        assert_eq!(cfg.encoders.len(), 2);
        assert_eq!(cfg.channels.len(), 2);
        assert_eq!(cfg.daemon.events_keep, 2);
    }

    #[test]
    fn headers_inside_strings_arrays_and_comments_are_not_cuts() {
        let not_toml =
            "[[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\nallow = [\n[[channel]]\n]\n";
        let text = format!("{HEAD}{}{not_toml}{}", channel(1), channel(2));
        assert!(same_as_whole(&text).is_none());
        let tricky = [
            "[[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\nspawn = { command = \"\"\"\n[[channel]]\nname = \"x\"\n\"\"\" }\n",
            "[[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\nspawn = { command = '''\n[[channel]]\n''' }\n",
            "[[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\nspawn = { command = \"a\\\"[[\", args = ['\"', \"#\"] }\n",
            "[[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\nspawn = { command = \"\"\"x\"\"\"\"\" }\n",
            "[[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\n# [[channel]]\n",
            "[[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\nenv = { \"[[channel]]\" = \"1\" }\n",
        ];
        for t in tricky {
            let text = format!("{HEAD}{}{t}{}", channel(1), channel(2));
            let cfg = same_as_whole(&text).expect("parsed in pieces");
            assert_eq!(cfg.channels.len(), 2, "{text}");
        }
    }

    #[test]
    fn anything_else_naming_channel_goes_to_the_whole_parse() {
        let cases = [
            format!("channel = []\n{HEAD}{}", channel(1)),
            format!("{HEAD}{}[channel.extra]\nx = 1\n", channel(1)),
            format!("{HEAD}{}[[ channel ]]\nname = \"c2\"\n", channel(1)),
            format!("{HEAD}{}[[\"channel\"]]\nname = \"c2\"\n", channel(1)),
        ];
        for text in cases {
            assert!(same_as_whole(&text).is_none(), "{text}");
        }
    }

    #[test]
    fn errors_are_left_to_the_whole_parse() {
        let cases = [
            format!("{HEAD}{}name = \"dup\"\n", channel(1)),
            format!("{HEAD}{}", channel(1).replace("encoders", "encoderz")),
            format!("{HEAD}{}[ingest]\ninterface = \"x\"\n", channel(1)),
            format!("{HEAD}{}x = \"unterminated\n", channel(1)),
            format!("{HEAD}{}x = [1,\n", channel(1)),
            "[[channel]]\nname = \"c\"\nlisten = \"10.9.0.1:5000\"\nencoders = [\"a\"]\n"
                .to_owned(),
        ];
        for text in cases {
            assert!(same_as_whole(&text).is_none(), "{text}");
        }
    }

    #[test]
    fn the_shipped_example_parses_the_same_in_pieces() {
        let text = include_str!("../../../examples/nsfail.toml");
        assert!(same_as_whole(text).is_some());
    }
}
