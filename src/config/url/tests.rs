//! The user-info rule and redaction, on the parsers themselves.

use std::path::PathBuf;

use super::*;

#[test]
fn userinfo_ends_at_the_last_at() {
    // PostgreSQL: reserved characters in the password, as they are or percent-encoded.
    for (url, user, password, host, port, db) in [
        (
            "postgres://u:p@ss/w:rd@host/db",
            "u",
            "p@ss/w:rd",
            "host",
            None,
            "db",
        ),
        (
            "postgres://u:pa/ss@h:5433/db",
            "u",
            "pa/ss",
            "h",
            Some(5433),
            "db",
        ),
        ("postgres://u:p%2Fss@h/db", "u", "p/ss", "h", None, "db"),
        ("postgres://u:a?b#c@h/db", "u", "a?b#c", "h", None, "db"),
        ("postgres://u:%40%3A@h/db", "u", "@:", "h", None, "db"),
        (
            "postgresql://u:p:q@[::1]:6000/db",
            "u",
            "p:q",
            "::1",
            Some(6000),
            "db",
        ),
        (
            "postgres://u%3Ax:pw@[2001:db8::7]/d%40b",
            "u:x",
            "pw",
            "2001:db8::7",
            None,
            "d@b",
        ),
    ] {
        let p = parse_pg_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(p.user.as_deref(), Some(user), "{url}");
        assert_eq!(
            p.password.as_ref().map(Secret::expose),
            Some(password),
            "{url}"
        );
        assert_eq!(p.host.as_deref(), Some(host), "{url}");
        assert_eq!(p.port, port.map(PgPorts::single), "{url}");
        assert_eq!(p.dbname.as_deref(), Some(db), "{url}");
    }
    let p = parse_pg_url(
        "postgres://u:p/w@h/db?sslmode=verify-full&sslrootcert=/etc/ca%20x.pem\
         &sslcert=c.pem&sslkey=k.pem",
    )
    .unwrap();
    assert_eq!(p.sslmode, Some(SslMode::VerifyFull));
    assert_eq!(p.sslrootcert, Some(PathBuf::from("/etc/ca x.pem")));
    assert_eq!(p.sslcert, Some(PathBuf::from("c.pem")));
    assert_eq!(p.sslkey, Some(PathBuf::from("k.pem")));

    // NATS: the same rule; the client gets the URL without user info.
    for (url, server, creds) in [
        (
            "nats://user:pa/ss@host:4222",
            "nats://host:4222",
            Some(UrlCredentials::UserPassword(
                "user".into(),
                Secret::new("pa/ss"),
            )),
        ),
        (
            "nats://user:p%2Fss@host",
            "nats://host",
            Some(UrlCredentials::UserPassword(
                "user".into(),
                Secret::new("p/ss"),
            )),
        ),
        (
            "tls://u:a@b?c#d@[::1]:4443",
            "tls://[::1]:4443",
            Some(UrlCredentials::UserPassword(
                "u".into(),
                Secret::new("a@b?c#d"),
            )),
        ),
        (
            "s3cr%2Ft@host:4222",
            "nats://host:4222",
            Some(UrlCredentials::Token(Secret::new("s3cr/t"))),
        ),
        ("NATS://host", "nats://host", None),
        ("wss://host:443/ws", "wss://host:443/ws", None),
        ("[fe80::1]", "nats://[fe80::1]", None),
    ] {
        let u = parse_nats_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(u.server, server, "{url}");
        assert_eq!(u.credentials, creds, "{url}");
    }
    assert!(parse_nats_url("localhost").unwrap().is_loopback());
    assert!(parse_nats_url("nats://127.0.0.2:4222")
        .unwrap()
        .is_loopback());
    assert!(parse_nats_url("tls://[::1]").unwrap().is_loopback());
    assert!(!parse_nats_url("nats://10.0.0.1").unwrap().is_loopback());
}

#[test]
fn redaction_hides_all_user_info() {
    for (url, shown) in [
        ("nats://user:pa/ss@host:4222", "nats://***@host:4222"),
        ("nats://u:p@ss/w@host", "nats://***@host"),
        ("tok@host", "***@host"),
        ("nats://host:4222", "nats://host:4222"),
        ("postgres://u:p/w@h/db?x=1", "postgres://***@h/db?x=1"),
    ] {
        assert_eq!(redact_url_userinfo(url), shown, "{url}");
    }
}

/// Several hosts, each with its own port or the default one; lists in `host=` and `port=`;
/// `target_session_attrs`.
#[test]
fn several_hosts_each_with_its_port() {
    let p =
        parse_pg_url("postgres://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write").unwrap();
    assert_eq!(p.host.as_deref(), Some("h1,h2"));
    assert_eq!(p.port, Some(PgPorts::from(vec![5432, 5433])));
    assert_eq!(p.target_session_attrs, Some(TargetSessionAttrs::ReadWrite));
    assert_eq!(p.password.as_ref().map(Secret::expose), Some("pw"));
    assert_eq!(p.dbname.as_deref(), Some("db"));

    // A host without a port gets the default; no port at all leaves the port unset.
    let p = parse_pg_url("postgres://u@h1,h2:5433/db").unwrap();
    assert_eq!(p.port, Some(PgPorts::from(vec![5432, 5433])));
    let p = parse_pg_url("postgres://u@h1,h2/db").unwrap();
    assert_eq!((p.host.as_deref(), p.port), (Some("h1,h2"), None));
    assert_eq!(p.target_session_attrs, None);

    let p = parse_pg_url("postgres://u@[::1]:6000,[2001:db8::7]:6001,h3/db").unwrap();
    assert_eq!(p.host.as_deref(), Some("::1,2001:db8::7,h3"));
    assert_eq!(p.port, Some(PgPorts::from(vec![6000, 6001, 5432])));

    let p = parse_pg_url("postgres:///db?host=a,b&port=1,2&target_session_attrs=primary").unwrap();
    assert_eq!(p.host.as_deref(), Some("a,b"));
    assert_eq!(p.port, Some(PgPorts::from(vec![1, 2])));
    assert_eq!(p.target_session_attrs, Some(TargetSessionAttrs::Primary));
    let p = parse_pg_url("postgres://h/db?target_session_attrs=any").unwrap();
    assert_eq!(p.target_session_attrs, Some(TargetSessionAttrs::Any));

    for (url, expect) in [
        ("postgres://u:s3cret@h1,/db", "empty"),
        ("postgres://u:s3cret@h1:1,h2:99999/db", "port"),
        ("postgres://u:s3cret@[::1,h2/db", "IPv6"),
        (
            "postgres://u:s3cret@h/db?target_session_attrs=prefer-standby",
            "primary",
        ),
    ] {
        let err = parse_pg_url(url).unwrap_err();
        assert!(err.contains(expect), "{url}: {err}");
        assert!(!err.contains("s3cret"), "{url}: {err}");
    }
}
