//! NATS connection and JetStream set-up against a real nats-server: stream creation and
//! re-use, warnings about existing streams, the errors a person can act on, reconnect counting.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use pgbridge::config::{NatsConfig, Secret, StreamsConfig};
use pgbridge::sink::nats::{self as sink, NatsError, StreamWarning, CONNECTION_NAME};
use pgbridge::wire::names::{CDC_SUBJECT_PREFIX, INIT_SUBJECT_PREFIX};

use testkit::NatsServer;

fn nats_config(url: String) -> NatsConfig {
    NatsConfig {
        urls: vec![url],
        ..Default::default()
    }
}

/// Polls `check` every 25 ms until it holds, at most `timeout`; panics with `what` otherwise.
async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Bounds a step of a test in time.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than 30 s"))
}

#[tokio::test(flavor = "current_thread")]
async fn streams_are_created_with_the_design_settings_and_reused() {
    let nats = NatsServer::start();
    let (client, stats) = bounded(
        "connect",
        sink::connect(&nats_config(nats.url()), CONNECTION_NAME),
    )
    .await
    .expect("connect");
    assert!(stats.is_connected());
    assert_eq!(sink::max_payload(&client), 1024 * 1024);
    let js = jetstream::new(client);
    let streams = StreamsConfig {
        cdc_max_age_secs: 3 * 86_400,
        cdc_duplicate_window_secs: 300,
        ..Default::default()
    };

    let info = bounded("ensure_streams", sink::ensure_streams(&js, &streams))
        .await
        .expect("ensure_streams");
    assert_eq!(info.created, vec!["CDC".to_owned(), "INIT".to_owned()]);
    assert_eq!(info.warnings, vec![]);
    // A single server: the CDC stream has one replica, which a host crash can cost data.
    assert_eq!(
        info.durability,
        vec![StreamWarning::SingleReplica {
            stream: "CDC".into()
        }]
    );
    assert_eq!(info.cdc_last_sequence, 0);

    let mut cdc = js.get_stream("CDC").await.expect("CDC exists");
    let c = cdc.info().await.unwrap().config.clone();
    assert_eq!(c.subjects, vec![format!("{CDC_SUBJECT_PREFIX}.>")]);
    assert_eq!(c.storage, StorageType::File);
    assert_eq!(c.retention, RetentionPolicy::Limits);
    assert_eq!(c.discard, DiscardPolicy::Old);
    assert_eq!(c.max_age, Duration::from_secs(3 * 86_400));
    assert_eq!(c.duplicate_window, Duration::from_secs(300));
    // The server (2.14 or later) takes fast-ingest batches; the bridge's stream allows them.
    assert!(c.allow_batch_publish);
    let mut init = js.get_stream("INIT").await.expect("INIT exists");
    let i = init.info().await.unwrap().config.clone();
    assert_eq!(i.subjects, vec![format!("{INIT_SUBJECT_PREFIX}.>")]);
    assert_eq!(i.storage, StorageType::File);
    assert_eq!(i.retention, RetentionPolicy::Limits);
    assert_eq!(i.discard, DiscardPolicy::Old);
    assert_eq!(i.max_age, Duration::from_secs(7 * 86_400));

    for n in 0..3 {
        js.publish("cdc.users.insert", format!("{n}").into())
            .await
            .unwrap()
            .await
            .expect("PubAck");
    }

    // Again: nothing created, nothing changed, the last sequence is reported.
    let again = bounded("ensure_streams again", sink::ensure_streams(&js, &streams))
        .await
        .expect("ensure_streams again");
    assert_eq!(again.created, Vec::<String>::new());
    assert_eq!(again.warnings, vec![]);
    assert_eq!(again.cdc_last_sequence, 3);
    assert_eq!(again.cdc.config, c);
    assert_eq!(again.init.config, i);
    assert_eq!(sink::stream_last_sequence(&js, "CDC").await.unwrap(), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn an_existing_stream_is_left_as_it_is_with_warnings() {
    let nats = NatsServer::start();
    let (client, _stats) = bounded(
        "connect",
        sink::connect(&nats_config(nats.url()), CONNECTION_NAME),
    )
    .await
    .expect("connect");
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "CDC".to_owned(),
        subjects: vec!["cdc.>".to_owned()],
        storage: StorageType::Memory,
        duplicate_window: Duration::from_secs(10),
        ..Default::default()
    })
    .await
    .expect("create weak CDC stream");

    let info = bounded(
        "ensure_streams",
        sink::ensure_streams(&js, &StreamsConfig::default()),
    )
    .await
    .expect("ensure_streams");
    assert_eq!(info.created, vec!["INIT".to_owned()]);
    assert_eq!(
        info.warnings,
        vec![
            StreamWarning::MemoryStorage {
                stream: "CDC".into()
            },
            StreamWarning::DuplicateWindowTooShort {
                stream: "CDC".into(),
                actual: Duration::from_secs(10),
                wanted: Duration::from_secs(120),
            },
        ]
    );
    let text = info.warnings[1].to_string();
    assert!(text.contains("duplicate window of 10s"), "{text}");

    // Left as it was.
    let mut cdc = js.get_stream("CDC").await.unwrap();
    let c = &cdc.info().await.unwrap().config;
    assert_eq!(c.storage, StorageType::Memory);
    assert_eq!(c.duplicate_window, Duration::from_secs(10));
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_without_jetstream_gives_the_jetstream_disabled_error() {
    let nats = NatsServer::start_without_jetstream();
    let (client, _stats) = bounded(
        "connect",
        sink::connect(&nats_config(nats.url()), CONNECTION_NAME),
    )
    .await
    .expect("connect");
    let js = jetstream::new(client);

    let err = bounded(
        "ensure_streams",
        sink::ensure_streams(&js, &StreamsConfig::default()),
    )
    .await
    .expect_err("JetStream is off");
    assert!(
        matches!(err, NatsError::JetStreamDisabled { .. }),
        "{err:?}"
    );
    assert!(err.is_configuration());
    let text = err.to_string();
    assert!(
        text.starts_with(
            "JetStream is not enabled on the NATS server: start nats-server with -js \
             (or jetstream {} in its config)"
        ),
        "{text}"
    );
    let err = sink::check_jetstream(&js)
        .await
        .expect_err("JetStream is off");
    assert!(
        matches!(err, NatsError::JetStreamDisabled { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_unreachable_server_fails_fast_with_redacted_urls() {
    let port = testkit::free_port();
    let config = nats_config(format!("nats://bridge:hunter2-secret@127.0.0.1:{port}"));
    let started = Instant::now();
    let err = bounded("connect", sink::connect(&config, CONNECTION_NAME))
        .await
        .expect_err("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, NatsError::Unreachable { .. }), "{err:?}");
    assert!(!err.is_configuration());
    let text = err.to_string();
    assert!(
        text.contains(&format!("nats://***@127.0.0.1:{port}")),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!format!("{err:?}").contains("hunter2"));
}

#[tokio::test(flavor = "current_thread")]
async fn user_and_password_are_used_and_a_wrong_one_is_an_authentication_error() {
    const PASSWORD: &str = "s3cret-pa55word";
    let nats = NatsServer::start_with_args(&["--user", "bridge", "--pass", PASSWORD]);
    let with = |user: &str, password: &str| NatsConfig {
        user: Some(user.to_owned()),
        password: Some(Secret::new(password)),
        ..nats_config(nats.url())
    };

    let (client, stats) = bounded(
        "connect",
        sink::connect(&with("bridge", PASSWORD), CONNECTION_NAME),
    )
    .await
    .expect("the right credentials connect");
    assert!(stats.is_connected());
    let js = jetstream::new(client);
    sink::check_jetstream(&js).await.expect("JetStream answers");

    for config in [
        with("bridge", "wrong-password"),
        with("nobody", PASSWORD),
        nats_config(nats.url()),
    ] {
        let started = Instant::now();
        let err = bounded("connect", sink::connect(&config, CONNECTION_NAME))
            .await
            .expect_err("wrong credentials are refused");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, NatsError::Authentication { .. }), "{err:?}");
        assert!(err.is_configuration());
        let text = err.to_string();
        assert!(text.contains("NATS_BRIDGE_PASSWORD"), "{text}");
        assert!(!text.contains(PASSWORD), "{text}");
        assert!(!text.contains("wrong-password"), "{text}");
        assert!(!format!("{err:?}").contains(PASSWORD));
    }
}

/// Credentials written in the URL authenticate (the client itself would ignore them), also
/// with reserved characters in the password, unescaped or percent-encoded.
#[tokio::test(flavor = "current_thread")]
async fn credentials_in_the_url_authenticate_with_reserved_characters() {
    const PASSWORD: &str = "pa/ss@w?rd#1";
    let nats = NatsServer::start_with_args(&["--user", "bridge", "--pass", PASSWORD]);
    let port = nats.port();
    for url in [
        format!("nats://bridge:{PASSWORD}@127.0.0.1:{port}"),
        format!("nats://bridge:pa%2Fss%40w%3Frd%231@127.0.0.1:{port}"),
        format!("bridge:{PASSWORD}@127.0.0.1:{port}"),
    ] {
        let config = nats_config(url);
        config.validate().expect("valid");
        let (client, _) = bounded("connect", sink::connect(&config, CONNECTION_NAME))
            .await
            .expect("the URL's credentials connect");
        sink::check_jetstream(&jetstream::new(client))
            .await
            .expect("JetStream answers");
    }
    let config = nats_config(format!("nats://bridge:pa/ss-wrong@127.0.0.1:{port}"));
    let err = bounded("connect", sink::connect(&config, CONNECTION_NAME))
        .await
        .expect_err("a wrong password is refused");
    assert!(matches!(err, NatsError::Authentication { .. }), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("pa/ss-wrong"), "{text}");
    assert!(text.contains("nats://***@127.0.0.1"), "{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_restart_is_counted_as_disconnect_and_reconnect() {
    let mut nats = NatsServer::start();
    let (client, stats) = bounded(
        "connect",
        sink::connect(&nats_config(nats.url()), CONNECTION_NAME),
    )
    .await
    .expect("connect");
    // The initial connection is not a reconnect.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(stats.is_connected());
    assert_eq!(stats.reconnects(), 0);
    assert_eq!(stats.disconnects(), 0);

    nats.stop();
    wait_until("the client to notice", Duration::from_secs(15), || {
        !stats.is_connected()
    })
    .await;
    assert!(stats.disconnects() >= 1);

    nats.start_again();
    wait_until("the client to reconnect", Duration::from_secs(20), || {
        stats.is_connected() && stats.reconnects() >= 1
    })
    .await;
    assert_eq!(stats.reconnects(), 1);

    // The connection works again.
    let js = jetstream::new(client);
    bounded(
        "ensure_streams after reconnect",
        sink::ensure_streams(&js, &StreamsConfig::default()),
    )
    .await
    .expect("JetStream after reconnect");
}
