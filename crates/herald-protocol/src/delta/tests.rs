use super::*;
use proptest::prelude::*;

/// Deltas checked against the reference implementation, the `fossil-delta` npm package
/// (2.0.0), whose `applyDelta` is the decoder centrifuge-js uses: for each case its
/// `createDelta` gives exactly these bytes, and its `applyDelta` turns `old` into `new`
/// with them. The inputs are Herald's own.
const GOLDEN: [(&str, &str, &[u8]); 3] = [
    (
        "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.",
        "The quick brown fox leaps over the lazy dog, then naps in the warm afternoon sun!",
        b"1H\nK@0,3:leau@N,1:!3LELRj;",
    ),
    (
        r#"{"id":7,"user":"alice","status":"online","score":1200,"tags":["a","b","c"],"bio":"likes long walks and short deltas"}"#,
        r#"{"id":7,"user":"alice","status":"away","score":1250,"tags":["a","b","c"],"bio":"likes long walks and short deltas"}"#,
        b"1o\nX@0,H:away\",\"score\":12511@p,1Qsx~p;",
    ),
    (
        "Grüße aus Köln — ünïcödé everywhere, ünïcödé everywhere, ünïcödé!",
        "Grüße aus Bonn — ünïcödé everywhere, ünïcödé everywhere, ünïcödé?",
        "1H\nF:Grüße aus Bon11@G,1:?3G0ymz;".as_bytes(),
    ),
];

#[test]
fn golden_deltas_match_the_reference_encoder() {
    for (old, new, delta) in GOLDEN {
        assert_eq!(
            fossil_create(old.as_bytes(), new.as_bytes()),
            delta,
            "{new}"
        );
        assert_eq!(fossil_apply(old.as_bytes(), delta).unwrap(), new.as_bytes());
    }
}

#[test]
fn applies_a_reference_delta_that_splits_a_character() {
    // The reference encoder copies the first byte of "è" (c3) and inserts the second (a8).
    let old = "the menu of the day: café au lait and a croissant, served until noon every day";
    let new = "the menu of the day: cafè au lait and a croissant, served until noon every day";
    let reference = b"1F\nP@0,1:\xa8q@Q,2Zymm5;";
    assert_eq!(
        fossil_apply(old.as_bytes(), reference).unwrap(),
        new.as_bytes()
    );
    // Herald's delta keeps characters whole, so it is valid UTF-8 and fits a JSON string.
    // These bytes were checked with the reference `applyDelta` too.
    let ours = fossil_create(old.as_bytes(), new.as_bytes());
    assert_eq!(ours, "1F\nO@0,2:èq@Q,2Zymm5;".as_bytes());
    assert_eq!(fossil_apply(old.as_bytes(), &ours).unwrap(), new.as_bytes());
}

#[test]
fn hand_made_delta_from_the_format() {
    // "hello world" -> "hello there world": copy 6 bytes from 0, insert "there ", copy 5
    // from 6. Checksum: the words "hell" "o th" "ere " "worl" "d\0\0\0" summed as
    // big-endian u32s, written in base 64.
    let new = b"hello there world";
    let sum = [
        u32::from_be_bytes(*b"hell"),
        u32::from_be_bytes(*b"o th"),
        u32::from_be_bytes(*b"ere "),
        u32::from_be_bytes(*b"worl"),
        u32::from_be_bytes(*b"d\0\0\0"),
    ]
    .iter()
    .fold(0u32, |a, w| a.wrapping_add(*w));
    assert_eq!(checksum(new), sum);
    let mut delta = b"H\n6@0,6:there 5@6,".to_vec();
    put_number(&mut delta, u64::from(sum));
    delta.push(b';');
    assert_eq!(fossil_apply(b"hello world", &delta).unwrap(), new);
    assert_eq!(fossil_target_size(&delta), Ok(17));
}

#[test]
fn numbers_round_trip() {
    for v in [0u64, 1, 63, 64, 4095, 4096, u64::from(u32::MAX), u64::MAX] {
        let mut out = Vec::new();
        put_number(&mut out, v);
        assert_eq!(out.len(), number_len(v));
        out.push(b'\n');
        let mut r = Reader { delta: &out, at: 0 };
        assert_eq!(r.number(), Ok(v));
    }
    let mut one = Vec::new();
    put_number(&mut one, 64);
    assert_eq!(one, b"10");
}

#[test]
fn small_and_empty_inputs() {
    for (old, new) in [
        (&b""[..], &b""[..]),
        (b"", b"abc"),
        (b"abc", b""),
        (b"short", b"shorter"),
        (&[7u8; 100][..], &[7u8; 1000][..]),
    ] {
        let d = fossil_create(old, new);
        assert_eq!(fossil_apply(old, &d).unwrap(), new);
    }
    assert_eq!(fossil_create(b"", b""), b"0\n0;");
}

#[test]
fn hostile_deltas_are_errors() {
    let base = b"0123456789abcdef0123456789";
    let cases: &[(&[u8], DeltaError)] = &[
        (b"", DeltaError::Truncated),
        (b"3", DeltaError::Truncated),
        (b"\n", DeltaError::MissingNumber { at: 0 }),
        (
            b"3!",
            DeltaError::Expected {
                at: 1,
                expected: '\n',
            },
        ),
        (b"~~~~~~~~~~~~\n", DeltaError::NumberOverflow { at: 0 }),
        (b"3\n", DeltaError::Truncated),
        (b"3\n3", DeltaError::Truncated),
        (b"3\n3?", DeltaError::UnknownCommand { at: 3, found: '?' }),
        (
            b"3\n3@Z,",
            DeltaError::CopyOutOfRange {
                offset: 35,
                len: 3,
                base_len: 26,
            },
        ),
        (
            b"3\n~~~~~~~~~~@~~~~~~~~~~,",
            DeltaError::CopyOutOfRange {
                offset: (1 << 60) - 1,
                len: (1 << 60) - 1,
                base_len: 26,
            },
        ),
        (
            b"3\n3@0;",
            DeltaError::Expected {
                at: 5,
                expected: ',',
            },
        ),
        (b"3\n5:ab", DeltaError::InsertPastEnd { len: 5 }),
        (b"3\n4@0,", DeltaError::OutputTooLong { declared: 3 }),
        (b"3\n4:abcd", DeltaError::OutputTooLong { declared: 3 }),
        (
            b"3\n2@0,0;",
            DeltaError::SizeMismatch {
                declared: 3,
                actual: 2,
            },
        ),
        (
            b"3\n3@0,0;",
            DeltaError::ChecksumMismatch {
                expected: 0,
                actual: checksum(b"012"),
            },
        ),
        (b"0\n0;x", DeltaError::TrailingBytes { at: 4 }),
    ];
    for (delta, err) in cases {
        assert_eq!(
            fossil_apply(base, delta).as_ref(),
            Err(err),
            "{:?}",
            String::from_utf8_lossy(delta)
        );
    }
}

#[test]
fn declared_size_does_not_drive_allocation() {
    // A huge declared size with nothing behind it fails without reserving that much.
    let delta = b"~~~~~~~~~\n0;";
    assert!(matches!(
        fossil_apply(b"", delta),
        Err(DeltaError::SizeMismatch { .. })
    ));
}

/// A ~2 KiB JSON document as a realistic publication: one field changes each time.
fn document(step: u32) -> Vec<u8> {
    let mut fields = Vec::new();
    for i in 0..30 {
        let value = if i == 17 { step * 7 } else { i * 1000 + 13 };
        fields.push(format!(
            r#""metric_{i:02}":{{"value":{value},"unit":"ms","label":"sensor {i} of rack b"}}"#
        ));
    }
    format!(r#"{{"host":"edge-3","series":{{{}}}}}"#, fields.join(",")).into_bytes()
}

/// Measured: the document is 2,103 bytes and the delta for a change of one field averages
/// 35 bytes over 50 publications, 1.7% of the full data (printed with `--nocapture`).
#[test]
fn delta_of_a_realistic_stream_is_small() {
    let mut prev = document(0);
    let mut total_full = 0;
    let mut total_delta = 0;
    for step in 1..=50 {
        let next = document(step);
        let d = fossil_create(&prev, &next);
        assert_eq!(fossil_apply(&prev, &d).unwrap(), next);
        total_full += next.len();
        total_delta += d.len();
        prev = next;
    }
    println!(
        "full {} bytes per publication, delta {} bytes on average",
        total_full / 50,
        total_delta / 50
    );
    assert!(total_full / 50 > 2000);
    assert!(total_delta / 50 < 40, "{}", total_delta / 50);
}

fn utf8_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zé€😀 ,.{}\":0-9]{0,300}").unwrap()
}

/// `new` made from pieces of `old` with small edits, the case deltas are for.
fn similar() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        proptest::collection::vec(any::<u8>(), 0..600),
        proptest::collection::vec(
            (
                any::<usize>(),
                0usize..40,
                proptest::collection::vec(any::<u8>(), 0..8),
            ),
            0..6,
        ),
    )
        .prop_map(|(old, edits)| {
            let mut new = old.clone();
            for (at, remove, insert) in edits {
                let at = if new.is_empty() { 0 } else { at % new.len() };
                let end = (at + remove).min(new.len());
                new.splice(at..end, insert);
            }
            (old, new)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn apply_inverts_create_on_arbitrary_bytes(
        old in proptest::collection::vec(any::<u8>(), 0..400),
        new in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let d = fossil_create(&old, &new);
        prop_assert_eq!(fossil_apply(&old, &d).unwrap(), new);
    }

    #[test]
    fn apply_inverts_create_on_similar_inputs((old, new) in similar()) {
        let d = fossil_create(&old, &new);
        prop_assert_eq!(fossil_apply(&old, &d).unwrap(), new);
    }

    #[test]
    fn deltas_of_text_are_text(old in utf8_text(), new in utf8_text()) {
        let d = fossil_create(old.as_bytes(), new.as_bytes());
        prop_assert!(std::str::from_utf8(&d).is_ok());
        prop_assert_eq!(fossil_apply(old.as_bytes(), &d).unwrap(), new.as_bytes());
    }

    #[test]
    fn hostile_deltas_never_panic(
        base in proptest::collection::vec(any::<u8>(), 0..64),
        delta in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = fossil_apply(&base, &delta);
        let _ = fossil_target_size(&delta);
    }

    #[test]
    fn mutated_deltas_never_panic(
        (old, new) in similar(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut d = fossil_create(&old, &new);
        for (at, byte) in flips {
            let i = at % d.len();
            d[i] = byte;
        }
        if let Ok(out) = fossil_apply(&old, &d) {
            // Whatever survives the checksum must at least have the declared size.
            prop_assert_eq!(Ok(out.len()), fossil_target_size(&d));
        }
    }
}
