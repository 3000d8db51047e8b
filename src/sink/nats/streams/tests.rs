//! Stream settings checks, formats and names.

use super::*;

fn cdc_requirements() -> Requirements {
    Requirements {
        subject: "cdc.>".to_owned(),
        max_age: Duration::from_secs(7 * 86_400),
        duplicate_window: Some(Duration::from_secs(120)),
    }
}

#[test]
fn subject_cover_rules() {
    assert!(subject_covers("cdc.>", "cdc.>"));
    assert!(subject_covers(">", "cdc.>"));
    assert!(subject_covers("*.>", "cdc.>"));
    assert!(!subject_covers("cdc.*", "cdc.>"));
    assert!(!subject_covers("cdc.*.*", "cdc.>"));
    assert!(!subject_covers("cdc", "cdc.>"));
    assert!(!subject_covers("init.>", "cdc.>"));
    assert!(!subject_covers("cdc.users.>", "cdc.>"));
    assert!(subject_covers("cdc.*", "cdc.users"));
    assert!(subject_covers("cdc.users.insert", "cdc.users.insert"));
    assert!(!subject_covers("cdc.users.insert", "cdc.users"));
}

#[test]
fn our_stream_configs_pass_our_checks() {
    let streams = StreamsConfig::default();
    let cdc = cdc_stream_config(&streams);
    assert_eq!(cdc.name, "CDC");
    assert_eq!(cdc.subjects, vec!["cdc.>".to_owned()]);
    assert_eq!(cdc.storage, StorageType::File);
    assert_eq!(cdc.discard, DiscardPolicy::Old);
    assert_eq!(cdc.retention, RetentionPolicy::Limits);
    assert_eq!(cdc.duplicate_window, Duration::from_secs(120));
    assert_eq!(cdc.num_replicas, 1);
    assert_eq!(check_stream(&cdc, &cdc_requirements()), vec![]);
    let init = init_stream_config(&streams);
    assert_eq!(init.name, "INIT");
    assert_eq!(init.subjects, vec!["init.>".to_owned()]);
    assert_eq!(init.max_age, Duration::from_secs(7 * 86_400));
    let r3 = StreamsConfig {
        replicas: 3,
        ..StreamsConfig::default()
    };
    assert_eq!(cdc_stream_config(&r3).num_replicas, 3);
    assert_eq!(init_stream_config(&r3).num_replicas, 3);
    let req = Requirements {
        subject: "init.>".to_owned(),
        max_age: Duration::from_secs(7 * 86_400),
        duplicate_window: None,
    };
    assert_eq!(check_stream(&init, &req), vec![]);
}

#[test]
fn every_broken_guarantee_is_reported() {
    let config = stream::Config {
        name: "CDC".to_owned(),
        subjects: vec!["cdc.users.*".to_owned()],
        storage: StorageType::Memory,
        duplicate_window: Duration::from_secs(10),
        max_age: Duration::from_secs(3600),
        discard: DiscardPolicy::New,
        max_bytes: 1 << 20,
        max_messages_per_subject: 5,
        retention: RetentionPolicy::WorkQueue,
        no_ack: true,
        ..Default::default()
    };
    let w = check_stream(&config, &cdc_requirements());
    assert_eq!(
        w,
        vec![
            StreamWarning::MemoryStorage {
                stream: "CDC".into()
            },
            StreamWarning::DuplicateWindowTooShort {
                stream: "CDC".into(),
                actual: Duration::from_secs(10),
                wanted: Duration::from_secs(120),
            },
            StreamWarning::SubjectsNotCovered {
                stream: "CDC".into(),
                subjects: vec!["cdc.users.*".into()],
                wanted: "cdc.>".into(),
            },
            StreamWarning::MaxAgeTooShort {
                stream: "CDC".into(),
                actual: Duration::from_secs(3600),
                wanted: Duration::from_secs(7 * 86_400),
            },
            StreamWarning::DiscardNewWithLimits {
                stream: "CDC".into()
            },
            StreamWarning::PerSubjectLimit {
                stream: "CDC".into(),
                limit: 5
            },
            StreamWarning::NotLimitsRetention {
                stream: "CDC".into(),
                retention: "workqueue"
            },
            StreamWarning::NoAck {
                stream: "CDC".into()
            },
        ]
    );
    assert!(w.iter().all(|w| w.stream() == "CDC"));
    let text = w[1].to_string();
    assert!(text.contains("10s") && text.contains("2m"), "{text}");
    assert!(text.contains("--dupe-window 2m"), "{text}");
}

#[test]
fn max_age_zero_means_unlimited() {
    let mut req = cdc_requirements();
    let mut config = cdc_stream_config(&StreamsConfig::default());
    config.max_age = Duration::ZERO;
    assert_eq!(check_stream(&config, &req), vec![]);
    // A limited stream where unlimited retention is configured is too short.
    req.max_age = Duration::ZERO;
    config.max_age = Duration::from_secs(86_400);
    let w = check_stream(&config, &req);
    assert!(
        matches!(&w[..], [StreamWarning::MaxAgeTooShort { .. }]),
        "{w:?}"
    );
    assert!(w[0].to_string().contains("unlimited"));
    // A longer retention than configured is fine.
    req.max_age = Duration::from_secs(3600);
    assert_eq!(check_stream(&config, &req), vec![]);
}

#[test]
fn discard_new_without_limits_is_fine() {
    let mut config = cdc_stream_config(&StreamsConfig::default());
    config.discard = DiscardPolicy::New;
    assert_eq!(check_stream(&config, &cdc_requirements()), vec![]);
    config.max_messages = 1000;
    assert_eq!(
        check_stream(&config, &cdc_requirements()),
        vec![StreamWarning::DiscardNewWithLimits {
            stream: "CDC".into()
        }]
    );
}

#[test]
fn single_replica_file_stream_gets_the_durability_warning() {
    let mut config = cdc_stream_config(&StreamsConfig::default());
    // The server's default for a stream created without a replica count is 1.
    assert!(config.num_replicas <= 1);
    let w = durability_warnings(&config);
    assert_eq!(
        w,
        vec![StreamWarning::SingleReplica {
            stream: "CDC".into()
        }]
    );
    let text = w[0].to_string();
    assert!(
        text.contains("unless nats-server syncs every write")
            && text.contains("sync_interval: always")
            && text.contains("--replicas 3"),
        "{text}"
    );
    config.num_replicas = 3;
    assert_eq!(durability_warnings(&config), vec![]);
    config.num_replicas = 1;
    config.storage = StorageType::Memory;
    assert_eq!(durability_warnings(&config), vec![]);
}

#[test]
fn payload_formats_are_told_by_the_first_byte() {
    use crate::config::Format;
    assert_eq!(payload_format(br#"{"table":"users"}"#), Format::Json);
    // A MessagePack map: fixmap, map16 or map32.
    assert_eq!(payload_format(&[0x8b, 0xa5]), Format::Msgpack);
    assert_eq!(payload_format(&[0xde, 0, 16]), Format::Msgpack);
    let mut config = stream::Config::default();
    assert_eq!(metadata_format(&config), None);
    config
        .metadata
        .insert(FORMAT_METADATA_KEY.into(), "json".into());
    assert_eq!(metadata_format(&config), Some(Format::Json));
    let e = NatsError::FormatMismatch {
        stream: "CDC".into(),
        found: "json",
        configured: "msgpack",
        source_of_format: "its metadata pgbridge.format".into(),
    };
    assert!(e.is_configuration());
    assert!(e.to_string().contains("start with --format json"));
}

#[test]
fn human_durations() {
    assert_eq!(human(Duration::from_secs(7 * 86_400)), "7d");
    assert_eq!(human(Duration::from_secs(7200)), "2h");
    assert_eq!(human(Duration::from_secs(120)), "2m");
    assert_eq!(human(Duration::from_secs(90)), "90s");
    assert_eq!(human(Duration::from_millis(1500)), "1500ms");
    assert_eq!(human(Duration::ZERO), "0ms");
}

#[test]
fn stream_names() {
    assert!(valid_stream_name("CDC"));
    assert!(valid_stream_name("my-cdc_2"));
    assert!(!valid_stream_name(""));
    assert!(!valid_stream_name("a.b"));
    assert!(!valid_stream_name("a b"));
    assert!(!valid_stream_name("a>"));
}
