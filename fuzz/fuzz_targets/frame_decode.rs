//! Raw bytes into `frame::decode`; see `tickstream::fuzzing::frame_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tickstream::fuzzing::frame_decode(data));
