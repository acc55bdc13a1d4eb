//! The MQTT packet reader: bytes from a client framed into packets and decoded the way the
//! MQTT front end does it (the first packet fixes the version). Must never panic; a frame
//! it cuts must lie within the input, and a packet's decoding must not depend on the bytes
//! after it.
#![no_main]

use herald_protocol::mqtt::{Reader, frame_len};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut reader = Reader::new(MAX);
    let mut again = Reader::new(MAX);
    let mut rest = data;
    while let Ok(Some(n)) = frame_len(rest, MAX) {
        assert!(n <= rest.len(), "a frame past the input");
        let (packet, tail) = rest.split_at(n);
        let first = reader.decode(packet);
        // The same packet copied on its own decodes the same way.
        let copy = packet.to_vec();
        let second = again.decode(&copy);
        assert_eq!(first.is_ok(), second.is_ok());
        if first.is_err() {
            break;
        }
        rest = tail;
    }
});
