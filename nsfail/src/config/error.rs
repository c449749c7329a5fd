//! Config errors: one line each, `ORIGIN:LINE:COL: message`, located by the TOML document's
//! spans.

use super::*;

/// A place in the config file: 1-based line and column (in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// A config that cannot be used. Displays as one line, `ORIGIN:LINE:COL: message` when the
/// place is known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{origin}: cannot read: {source}")]
    Read { origin: String, source: io::Error },
    /// Not TOML, a wrong type, an unknown or missing key.
    #[error("{}{message}", prefix(Some(.origin), .location))]
    Syntax {
        origin: String,
        location: Option<Location>,
        message: String,
    },
    /// Well-formed but wrong: a dangling or duplicate name, a port clash, a missing probe
    /// setting. `origin` and `location` are `None` for a config built in code.
    #[error("{}{message}", prefix(.origin.as_ref(), .location))]
    Invalid {
        origin: Option<String>,
        location: Option<Location>,
        message: String,
    },
}

impl ConfigError {
    /// Where in the file, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { location, .. } | Self::Invalid { location, .. } => *location,
        }
    }
}

pub(super) fn prefix(origin: Option<&String>, location: &Option<Location>) -> String {
    match (origin, location) {
        (Some(origin), Some(at)) => format!("{origin}:{}:{}: ", at.line, at.column),
        (Some(origin), None) => format!("{origin}: "),
        (None, _) => String::new(),
    }
}

/// The span of the value at `path`, or of its nearest ancestor present in the document (a
/// defaulted key is blamed on the table that left it out).
pub(super) fn span_of(doc: &DeValue<'_>, path: &[Seg]) -> Range<usize> {
    let mut value = doc;
    let mut span = 0..0;
    for seg in path {
        let next = match seg {
            Seg::Key(key) => value.get(*key),
            Seg::Index(index) => value.get(*index),
        };
        match next {
            Some(next) => {
                span = next.span();
                value = next.get_ref();
            }
            None => break,
        }
    }
    span
}

pub(super) fn location(text: &str, offset: usize) -> Location {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

pub(super) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
