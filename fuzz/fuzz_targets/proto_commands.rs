//! The Protobuf command decoder: varint-length-prefixed `Command` messages in one frame, and
//! their conversion to the session's command type. Must never panic; every message it yields
//! must re-encode and decode to the same command.
#![no_main]

use herald_protocol::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    for cmd in proto::decode_commands(data) {
        let Ok(cmd) = cmd else { break };
        let again = proto::Command::decode(cmd.encode_to_vec().as_slice())
            .expect("a decoded command re-encodes");
        assert_eq!(again, cmd);
        let _ = herald_protocol::client::Command::from(cmd);
    }
});
