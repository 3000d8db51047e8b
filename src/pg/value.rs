//! (in progress)
/// Client encoding for every session.
pub const CLIENT_ENCODING: &str = "UTF8";
/// Session settings for deterministic text output.
pub const SESSION_OPTIONS: &str =
    "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c timezone=UTC";
