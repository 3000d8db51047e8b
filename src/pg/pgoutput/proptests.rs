//! Property tests: no input makes the decoder panic, in either stream state.

use std::sync::OnceLock;

use proptest::prelude::*;

use super::test_vectors::{self, load};
use super::{Decoder, LogicalMessage};

/// Every captured message with the stream state it was decoded in.
fn captured() -> &'static [(Vec<u8>, bool)] {
    static ALL: OnceLock<Vec<(Vec<u8>, bool)>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut out = Vec::new();
        for (_, text) in test_vectors::ALL {
            let mut d = Decoder::new();
            for v in load(text) {
                let in_stream = d.in_stream();
                d.decode(&v.bytes).expect("captured vectors decode");
                out.push((v.bytes, in_stream));
            }
        }
        out
    })
}

/// An edit applied to a captured message; positions are taken modulo the length.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Xor(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    /// Overwrite four bytes, to hit lengths and counts with extreme values.
    SetI32(usize, i32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        (any::<usize>(), 1..=255u8).prop_map(|(p, b)| Mutation::Xor(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            prop_oneof![
                Just(i32::MIN),
                Just(-1),
                Just(0),
                Just(1),
                Just(i32::MAX),
                any::<i32>()
            ]
        )
            .prop_map(|(p, v)| Mutation::SetI32(p, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    let at = |p: usize| if len == 0 { 0 } else { p % len };
    match *m {
        Mutation::Set(p, b) if len > 0 => bytes[at(p)] = b,
        Mutation::Xor(p, b) if len > 0 => bytes[at(p)] ^= b,
        Mutation::Insert(p, b) => bytes.insert(p % (len + 1), b),
        Mutation::Remove(p) if len > 0 => {
            bytes.remove(at(p));
        }
        Mutation::Truncate(p) => bytes.truncate(p % (len + 1)),
        Mutation::SetI32(p, v) if len >= 4 => {
            let p = p % (len - 3);
            bytes[p..p + 4].copy_from_slice(&v.to_be_bytes());
        }
        _ => {}
    }
}

/// Decodes in both states and touches every decoded cell, so lazy paths run too.
fn exercise(bytes: &[u8]) {
    for in_stream in [false, true] {
        match LogicalMessage::parse(bytes, in_stream) {
            Ok(msg) => {
                let tuples = match &msg {
                    LogicalMessage::Insert(i) => vec![i.new],
                    LogicalMessage::Update(u) => {
                        u.old.iter().map(|o| o.tuple()).chain([u.new]).collect()
                    }
                    LogicalMessage::Delete(d) => vec![d.old.tuple()],
                    _ => vec![],
                };
                for t in tuples {
                    assert_eq!(t.iter().count(), t.len(), "validated tuple iterates fully");
                    let _ = format!("{t:?}");
                }
                let _ = format!("{msg:?}");
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(e.offset() <= bytes.len().max(1));
            }
        }
    }
}

const TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrpNKOntub\0\xff";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        exercise(&bytes);
    }

    #[test]
    fn random_bodies_behind_known_tags_never_panic(
        tag in proptest::sample::select(TAGS),
        body in proptest::collection::vec(
            prop_oneof![any::<u8>(), proptest::sample::select(TAGS)], 0..96),
    ) {
        let mut bytes = vec![tag];
        bytes.extend(body);
        exercise(&bytes);
    }

    #[test]
    fn mutated_captures_never_panic(
        index in any::<proptest::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let all = captured();
        let (original, in_stream) = &all[index.index(all.len())];
        let mut bytes = original.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        exercise(&bytes);
        // Through a decoder too: a failed message never changes the stream state.
        let mut d = Decoder::new();
        if *in_stream {
            d.decode(b"S\0\0\0\x01\x01").unwrap();
        }
        let before = d.in_stream();
        if d.decode(&bytes).is_err() {
            prop_assert_eq!(d.in_stream(), before);
        }
    }

    #[test]
    fn mutated_sequences_through_one_decoder_never_panic(
        picks in proptest::collection::vec(
            (any::<proptest::sample::Index>(), proptest::option::of(mutation())), 1..40),
    ) {
        let all = captured();
        let mut d = Decoder::new();
        for (index, m) in &picks {
            let mut bytes = all[index.index(all.len())].0.clone();
            if let Some(m) = m {
                apply(&mut bytes, m);
            }
            let before = d.in_stream();
            match d.decode(&bytes) {
                Ok(LogicalMessage::StreamStart(_)) => prop_assert!(d.in_stream()),
                Ok(LogicalMessage::StreamStop) => prop_assert!(!d.in_stream()),
                _ => prop_assert_eq!(d.in_stream(), before),
            }
        }
    }
}
