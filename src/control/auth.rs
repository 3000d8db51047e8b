//! The admin token check of the endpoints that change state or reach into JetStream.
//!
//! Without a configured token every such request is refused (403): an unconfigured bridge
//! has no admin surface. With one, the request must carry `Authorization: Bearer <token>`
//! (401 otherwise). The comparison takes the same time wherever the first difference is, and
//! neither the expected nor the presented token is ever logged or echoed.

use crate::config::Secret;

use super::response::Response;

/// Why an admin request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No admin token is configured: admin endpoints are off.
    #[error("admin endpoints are disabled: start the bridge with --admin-token / BRIDGE_ADMIN_TOKEN to enable them")]
    Disabled,
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token: send Authorization: Bearer <admin token>")]
    Missing,
    /// A token that does not match.
    #[error("invalid bearer token")]
    Invalid,
}

impl AuthError {
    /// The answer: 403 when disabled, 401 with `WWW-Authenticate` otherwise.
    pub fn response(self) -> Response {
        match self {
            AuthError::Disabled => Response::error(403, self.to_string()),
            AuthError::Missing | AuthError::Invalid => Response::error(401, self.to_string())
                .with_header("WWW-Authenticate", "Bearer realm=\"pgbridge\""),
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    // Keeps the optimiser from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization: Bearer <token>` header value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Checks the `Authorization` header against the configured admin token.
pub fn check(configured: Option<&Secret>, authorization: Option<&str>) -> Result<(), AuthError> {
    let expected = configured.ok_or(AuthError::Disabled)?;
    let presented = authorization.and_then(bearer).ok_or(AuthError::Missing)?;
    if constant_time_eq(presented.as_bytes(), expected.expose().as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_only_when_equal() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"abc\0", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn token_rules() {
        let t = Secret::new("s3cret");
        assert_eq!(check(None, Some("Bearer s3cret")), Err(AuthError::Disabled));
        assert_eq!(check(Some(&t), None), Err(AuthError::Missing));
        assert_eq!(
            check(Some(&t), Some("Basic s3cret")),
            Err(AuthError::Missing)
        );
        assert_eq!(check(Some(&t), Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(check(Some(&t), Some("s3cret")), Err(AuthError::Missing));
        assert_eq!(
            check(Some(&t), Some("Bearer wrong")),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            check(Some(&t), Some("Bearer s3cret2")),
            Err(AuthError::Invalid)
        );
        assert_eq!(check(Some(&t), Some("Bearer s3cret")), Ok(()));
        assert_eq!(check(Some(&t), Some("bearer   s3cret ")), Ok(()));
    }

    #[test]
    fn refusals_never_echo_the_token() {
        for e in [AuthError::Disabled, AuthError::Missing, AuthError::Invalid] {
            let r = e.response();
            assert!(!String::from_utf8_lossy(&r.body).contains("s3cret"));
        }
        assert_eq!(AuthError::Disabled.response().status, 403);
        let r = AuthError::Invalid.response();
        assert_eq!(r.status, 401);
        assert!(r.headers.iter().any(|(n, _)| *n == "WWW-Authenticate"));
    }
}
