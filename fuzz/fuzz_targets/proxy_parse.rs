//! Bytes at the start of a connection from a trusted balancer into
//! `proxy::parse`; see `tickstream::fuzzing::proxy_parse` for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tickstream::fuzzing::proxy_parse(data));
