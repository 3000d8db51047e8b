//! Help text shared by the flag groups.

use std::fmt::Display;

/// `text [default: value]`, so the help shows the defaults without clap applying them.
pub(super) fn with_default(text: &str, default: impl Display) -> String {
    format!("{text} [default: {default}]")
}
