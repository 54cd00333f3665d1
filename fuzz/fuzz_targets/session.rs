//! A client byte stream through decode and the real `Session`; see
//! `tickstream::fuzzing::session` for the input layout and invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tickstream::fuzzing::session(data));
